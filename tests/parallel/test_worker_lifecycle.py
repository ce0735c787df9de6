"""Tensor-parallel workers as users start them: a plain script without a main guard, and a worker
that exits at each stage of its life (rank 0 must fail within seconds, naming it).

Rank 0 runs in a subprocess with a timeout, so a regression fails these tests instead of hanging
them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from tests.parallel._procs import REPO, running, subprocess_env
from tests.parallel.conftest import IDS

HERE = Path(__file__).resolve().parent
# stage -> (exit code of the test worker, what rank 0 says it was doing); rendezvous last: rank 0
# abandons a rendezvous it cannot interrupt, which delays only a later start in the same process.
STAGES = {
    "start": (3, "while starting"),
    "load": (5, "while loading the model"),
    "step": (6, "during a step"),
    "rendezvous": (4, "while the process group was forming"),
}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.mark.slow
def test_a_plain_script_without_main_guard_runs_at_tp2(
    tp_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """The issue's script, verbatim but for the model and saving the logits: before, each worker
    re-imported it, died in multiprocessing's bootstrap, and rank 0 waited forever."""
    path, out = tp_model("llama"), tmp_path / "logits.pt"
    ids = IDS[:3]
    script = tmp_path / "tp.py"
    script.write_text(
        "import torch\n"
        "from anyquant import LLM\n"
        f"llm = LLM({str(path)!r}, tensor_parallel_size=2, dtype='float32')\n"
        f"logits = llm.logits({ids})\n"
        "print(logits.shape)\n"
        f"torch.save(logits, {str(out)!r})\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == "torch.Size([3, 259])"
    assert "bootstrapping phase" not in done.stderr
    want = LLM(path, dtype="float32").logits(ids)
    assert float((torch.load(out) - want).abs().max()) < 1e-4


@pytest.mark.slow
def test_a_worker_exiting_at_any_stage_fails_rank_zero_within_seconds(
    tp_model: Callable[[str], Path],
) -> None:
    """Each stage: the error names rank 1, its pid and exit code, what rank 0 was doing, and quotes
    the worker's last output; it comes well within 10 s of the worker's exit (the worker prints
    its exit time, the error quotes it), and no worker process is left."""
    done = subprocess.run(
        [sys.executable, str(HERE / "_stage_failures.py"), str(tp_model("llama")), *STAGES],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["stage"] for r in results] == list(STAGES)
    for result in results:
        code, doing = STAGES[result["stage"]]
        error = result["error"]
        # The whole result on failure: a stage that raised nothing has no "type" (seen once, under
        # a loaded full run; not reproduced alone), and which stage it was is the clue.
        assert result.get("type") == "ParallelError", result
        head = rf"tensor-parallel rank 1 \(pid (\d+)\) exited with code {code} {doing}; its last output:\n"
        found = re.match(head, error)
        assert found, error
        assert f"| test worker exits at stage {result['stage']}" in error
        assert result["seconds_after_exit"] < 10.0, result
        assert not running(int(found.group(1)))
        assert result.get("workers_left", []) == []
