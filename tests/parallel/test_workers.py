"""`LLM(..., tensor_parallel_size=2)`: worker processes mirror rank 0's engine steps, and a worker
that dies or hangs fails the engine quickly with a message naming the rank."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.errors import AnyquantError
from anyquant.parallel.comm import all_reduce, gather_last_dim
from anyquant.parallel.launch import LocalWorkers, WorkerProcess
from anyquant.parallel.state import ParallelError, ParallelState
from tests.parallel.conftest import IDS

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [IDS, IDS[:5], [256, 65, 66, 67]]


def _worker_pids(llm: LLM) -> list[int]:
    return list(llm.model.workers.pids())


def _fake_workers(*codes: str) -> tuple[LocalWorkers, io.StringIO]:
    """Workers running `python -c code` (no torch: fast), their output echoed into a buffer."""
    echo = io.StringIO()
    workers = LocalWorkers()
    for rank, code in enumerate(codes, 1):
        popen = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        workers.processes[rank] = WorkerProcess(rank, popen, echo)
    return workers, echo


def test_a_blocked_wait_fails_as_soon_as_a_worker_exits() -> None:
    """What rank 0 does in a rendezvous or while loading: the call blocks on a peer; the worker's
    exit ends the wait with its rank, pid, exit code and last output (echoed with a prefix too)."""
    workers, echo = _fake_workers(
        "import time; time.sleep(60)",
        "import sys, time; time.sleep(0.5); print('step 1'); print('out of memory', file=sys.stderr); sys.exit(7)",
    )
    release = threading.Event()  # the blocked call ends with the test, not on its own timeout
    try:
        start = time.monotonic()
        with pytest.raises(ParallelError) as caught:
            workers.run_watched(lambda: release.wait(60), "while testing", lambda _: None)
        assert time.monotonic() - start < 10.0
        pid = workers.processes[2].pid
        assert str(caught.value) == (
            f"tensor-parallel rank 2 (pid {pid}) exited with code 7 while testing; its last output:\n"
            "  | step 1\n  | out of memory"
        )
        assert "(tp rank 2) out of memory" in echo.getvalue()
        with pytest.raises(ParallelError, match=r"rank 2 .* exited with code 7 while polling"):
            workers.wait_until(lambda: False, "while polling", timeout_s=30)
        os.kill(workers.processes[1].pid, signal.SIGKILL)
        workers.processes[1].join(10)
        with pytest.raises(ParallelError, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL while x"):
            workers.check("while x")
    finally:
        release.set()
        workers.stop(kill=True)
    assert not any(w.is_alive() for w in workers.processes.values())


def test_a_watched_call_returns_or_raises_its_own_outcome() -> None:
    workers, _ = _fake_workers("import time; time.sleep(60)")
    try:
        assert workers.run_watched(lambda: 42, "x", lambda _: None) == 42
        with pytest.raises(KeyError, match="mine"):
            workers.run_watched(lambda: {}["mine"], "x", lambda _: None)
        workers.wait_until(lambda: True, "x", timeout_s=1)
    finally:
        workers.stop(kill=True)


@pytest.mark.slow
def test_generation_and_scoring_match_one_process(tp_model: Callable[[str], Path]) -> None:
    path = tp_model("awq")
    one = LLM(path, dtype="float32")
    want = [o.token_ids for o in one.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    with LLM(path, dtype="float32", tensor_parallel_size=2) as two:
        got = [o.token_ids for o in two.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        assert got == want  # batched prefill, decode steps and prefix caching through the worker
        for n in (len(IDS), 6):  # a fresh private cache per call: workers create and drop twins
            diff = (two.logits(IDS[:n]) - one.logits(IDS[:n])).abs().max()
            assert float(diff) < 1e-4
        procs = list(two.model.workers.processes.values())
    assert all(not p.is_alive() for p in procs)  # close() ended the workers


@pytest.mark.slow
def test_killed_worker_fails_the_engine_quickly_naming_the_rank(tp_model: Callable[[str], Path]) -> None:
    llm = LLM(tp_model("awq"), dtype="float32", tensor_parallel_size=2)
    try:
        llm.engine.add_request(IDS, SamplingParams(max_tokens=40, temperature=0.0))
        for _ in range(3):
            llm.engine.step()
        (pid,) = _worker_pids(llm)
        os.kill(pid, signal.SIGKILL)
        llm.model.workers.processes[1].join(10)  # dead while idle (death mid-step: test_worker_lifecycle)
        start = time.monotonic()
        with pytest.raises(
            ParallelError, match=rf"rank 1 \(pid {pid}\) was killed by signal SIGKILL between"
        ):
            llm.engine.step()
        assert time.monotonic() - start < 5.0
        with pytest.raises(ParallelError, match="rank 1"):  # the group stays failed, without waiting
            llm.logits(IDS)
    finally:
        llm.close()


@pytest.mark.slow
def test_hung_worker_fails_after_the_timeout_naming_the_rank(tp_model: Callable[[str], Path]) -> None:
    llm = LLM(tp_model("awq"), dtype="float32", tensor_parallel_size=2, tp_timeout_s=2.0)
    try:
        llm.logits(IDS)
        (pid,) = _worker_pids(llm)
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ParallelError, match=rf"rank 1 \(pid {pid}\) stopped responding"):
            llm.logits(IDS)
        assert time.monotonic() - start < 2.0 + 4.0
    finally:
        llm.close()  # SIGKILL ends the stopped worker too


def test_torchrun_world_size_must_match(
    tp_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(AnyquantError, match="torchrun started WORLD_SIZE=4"):
        LLM(tp_model("awq"), tensor_parallel_size=2)


def test_collectives_are_no_ops_at_world_size_one() -> None:
    x = torch.randn(3, 5)
    state = ParallelState()
    assert all_reduce(x, state) is x
    assert gather_last_dim(x, state, 4) is x


@pytest.mark.slow
def test_torchrun_starts_the_same_llm_on_every_rank(tp_model: Callable[[str], Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    from anyquant.parallel.state import free_port

    path, out = tp_model("awq"), tmp_path / "logits.pt"
    script = Path(__file__).with_name("_torchrun_script.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    ids = ",".join(map(str, IDS))
    subprocess.run(
        [*cmd, str(script), str(path), ids, str(out)], check=True, timeout=240, capture_output=True
    )
    want = LLM(path, dtype="float32").logits(IDS)
    assert float((torch.load(out) - want).abs().max()) < 1e-4


def test_step_messages_round_trip() -> None:
    """What rank 0 publishes is what every worker rebuilds: ids, positions, attention metadata, rows."""
    from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
    from anyquant.parallel.wire import pack, unpack
    from anyquant.workers.rank_zero import encode_forward
    from anyquant.workers.worker import decode_forward

    cache = PagedKVCache(1, 4, 4, 1, 2, 2, torch.float32)
    ctx = PagedAttention.for_sequences(cache, [([2], 0, 3), ([0, 1], 5, 1)])
    ids, positions, rows = torch.tensor([5, 6, 7, 8]), torch.tensor([0, 1, 2, 5]), torch.tensor([2, 3])
    forward = encode_forward(7, ids, positions, ctx, rows)
    first, second = unpack(pack([torch.tensor([3, 9]), forward]))
    assert first.tolist() == [3, 9]
    assert int(second[1]) == 7  # the cache id
    got_ids, got_pos, got_ctx, got_rows, got_embeds = decode_forward(second, torch.device("cpu"), cache)
    assert got_embeds is None
    assert torch.equal(got_ids, ids) and torch.equal(got_pos, positions)
    assert got_rows is not None and torch.equal(got_rows, rows)
    assert got_ctx.slot_mapping.tolist() == [8, 9, 10, 5]  # page 2 slots 0-2, then page 1 slot 1
    assert torch.equal(got_ctx.block_tables, ctx.block_tables)
    assert (got_ctx.query_lens, got_ctx.context_lens) == ([3, 1], [3, 6])
    no_rows = decode_forward(
        unpack(pack([encode_forward(0, ids, positions, ctx, None)]))[0], torch.device("cpu"), cache
    )
    assert no_rows[3] is None


def test_step_messages_carry_multirow_positions_and_encoder_rows_exactly() -> None:
    """M-RoPE positions [3, T] and image embeddings (fp32 bit patterns) reach the workers unchanged."""
    from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
    from anyquant.models.base import InputEmbeds
    from anyquant.parallel.wire import pack, unpack
    from anyquant.workers.rank_zero import encode_forward
    from anyquant.workers.worker import decode_forward

    cache = PagedKVCache(1, 4, 4, 1, 2, 2, torch.float32)
    ctx = PagedAttention.for_sequences(cache, [([2], 0, 3), ([0, 1], 5, 1)])
    ids = torch.tensor([5, 6, 7, 8])
    positions = torch.tensor([[0, 1, 1, 4], [0, 0, 1, 4], [0, 1, 0, 4]])
    values = torch.randn(2, 5) * 1e30  # extreme magnitudes survive too
    values[0, 0] = float("-0.0")
    embeds = InputEmbeds(torch.tensor([1, 2]), values)
    message = unpack(pack([encode_forward(3, ids, positions, ctx, None, embeds)]))[0]
    got_ids, got_pos, _, got_rows, got_embeds = decode_forward(message, torch.device("cpu"), cache)
    assert torch.equal(got_ids, ids) and torch.equal(got_pos, positions) and got_rows is None
    assert got_embeds is not None and torch.equal(got_embeds.rows, embeds.rows)
    assert torch.equal(got_embeds.values.view(torch.int32), values.view(torch.int32))
