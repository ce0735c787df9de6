"""What a decode step's layers may not do on the host: read a tensor's values (a host sync per
layer), store a bucket's padding rows; and the captured step's guards, skipped once warmed up.

Host syncs are counted as the aten ops that read values back (`_local_scalar_dense` behind
`item()` / `bool()` / `int()`, `nonzero`, indexing by a boolean mask), seen by a dispatch mode
around the per-layer calls; the step's plan is built before, once per step, as the engine does.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anyquant import LLM, SamplingParams
from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.layers.attention import plan_paged_attention
from anyquant.layers.custom_ops import register_ops, set_decode_step
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.attention_reference import causal_attention_float64

SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}


class _HostReads(TorchDispatchMode):
    """Records the aten ops that read a tensor's values back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in SYNC_OPS or (name.startswith("index") and _bool_index(args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(args: tuple[object, ...]) -> bool:
    """A boolean mask among an index op's indices (its output size is the mask's count)."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


# (pages, tokens cached before the step) of three decoding sequences
SEQUENCES = [([5, 17, 2, 30, 11], 18), ([9, 3, 21, 7], 13), ([12, 25], 4)]


def _cache(layers: int = 3) -> PagedKVCache:
    torch.manual_seed(0)
    cache = PagedKVCache(layers, 32, 4, 2, 8, 8, torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    return cache


def _slots(pages: list[int], positions: range, page: int) -> list[int]:
    return [pages[p // page] * page + p % page for p in positions]


def test_eager_decode_layers_read_nothing_back() -> None:
    cache = _cache()
    ctx = PagedAttention.for_sequences(cache, [(p, c, 1) for p, c in SEQUENCES])
    ctx.plan(None)  # once per step, before the layers
    q, k, v = torch.randn(3, 6, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    with _HostReads() as reads:
        outs = [ctx.attend(layer, q, k, v, 8**-0.5) for layer in range(3)]
    assert reads.seen == []
    for layer, out in enumerate(outs):
        for b, (pages, cached) in enumerate(SEQUENCES):
            slots = torch.tensor(_slots(pages, range(cached + 1), cache.page_size))
            keys, values = cache.k[layer][:, slots].transpose(0, 1), cache.v[layer][:, slots].transpose(0, 1)
            assert torch.equal(keys[-1], k[b]) and torch.equal(values[-1], v[b])
            want = causal_attention_float64(q[b : b + 1], keys, values, cached + 1, None)
            assert torch.allclose(out[b : b + 1].double(), want, atol=1e-5)


@pytest.mark.parametrize("value_in_key", [False, True])
def test_captured_attention_op_stores_only_real_rows_and_reads_nothing_back(value_in_key: bool) -> None:
    """A bucket of 4 rows for 3 sequences: the padding row (slot -1, as the captured step pads)
    is neither stored nor a reason to look at the slots' values."""
    register_ops()
    torch.manual_seed(0)
    page = 4
    cache = PagedKVCache(1, 32, page, 2, 8, 8, torch.float32, value_in_key=value_in_key)
    cache.k.normal_()
    before = cache.k.clone()
    lens = [c + 1 for _, c in SEQUENCES] + [1]
    tables = torch.zeros(4, 5, dtype=torch.long)
    for b, (pages, _) in enumerate(SEQUENCES):
        tables[b, : len(pages)] = torch.tensor(pages)
    slots = torch.tensor([_slots(p, range(c, c + 1), page)[0] for p, c in SEQUENCES] + [-1])
    group = plan_paged_attention(tables, [1] * 4, lens, page).decode
    assert group is not None
    set_decode_step([group], real_rows=3)
    q, k, v = torch.randn(4, 6, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    if value_in_key:
        v = k.clone()  # the value is the key's prefix: stored with it
    value_cache = None if value_in_key else cache.v[0]
    with _HostReads() as reads:
        out = torch.ops.anyquant.paged_decode_attention(
            q, k, v, cache.k[0], value_cache, slots, 0, page, 8**-0.5
        )
    assert reads.seen == []
    changed = (cache.k[0] != before[0]).any(dim=(0, 2)).nonzero().flatten().tolist()
    assert changed == sorted(slots[:3].tolist())  # the three real rows' slots, nothing else
    for b, (pages, cached) in enumerate(SEQUENCES):
        ids = torch.tensor(_slots(pages, range(cached + 1), page))
        keys, values = cache.k[0][:, ids].transpose(0, 1), cache.v[0][:, ids].transpose(0, 1)
        assert torch.equal(keys[-1], k[b])
        want = causal_attention_float64(q[b : b + 1], keys, values, cached + 1, None)
        assert torch.allclose(out[b : b + 1].double(), want, atol=1e-5)


@pytest.mark.slow
def test_warmed_captured_step_skips_its_guards_and_picks_the_eager_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.eval_frame import _is_skip_guard_eval_unsafe_stance

    path = write_tiny_model(tmp_path / "m", "qwen2", seed=2)
    prompts = [[256, 5, 6, 7], [256, 40, 41], [256, *range(60, 70)]]  # 3 sequences -> bucket 4
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def greedy(llm: LLM) -> list[list[int]]:
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

    want = greedy(LLM(path, dtype="float32", max_model_len=64, max_num_seqs=4, enforce_eager=True))
    llm = LLM(path, dtype="float32", max_model_len=64, max_num_seqs=4, enforce_eager=True)
    assert llm.engine.runner.capture(63, 4, backend="aot_eager") is None
    captured = llm.engine.runner.captured
    assert captured is not None
    assert captured.graphs_per_function() == [1, 1]  # batch 1; every bucket above it
    assert captured.skip_guards
    stances: list[bool] = []
    compiled = list(captured._compiled)

    def spy(index: int):  # type: ignore[no-untyped-def]
        def call(*inputs: torch.Tensor) -> torch.Tensor:
            stances.append(_is_skip_guard_eval_unsafe_stance())
            return compiled[index](*inputs)

        return call

    captured._compiled = [spy(0), spy(1)]
    assert greedy(llm) == want
    assert captured.steps_run >= 7 and stances and all(stances)
    # Asked to, every guard is checked again; the tokens stay the same.
    monkeypatch.setenv("ANYQUANT_CHECK_ALL_GUARDS", "1")
    stances.clear()
    assert greedy(llm) == want
    assert stances and not any(stances)
    # A function holding several graphs (a kernel that specializes batch sizes) needs its guards
    # to pick one: they are kept; so where Dynamo cannot say how many it holds.
    monkeypatch.delenv("ANYQUANT_CHECK_ALL_GUARDS")
    for graphs in ([1, 2], None):
        monkeypatch.setattr(captured, "graphs_per_function", lambda graphs=graphs: graphs)
        captured.warm_up()
        assert not captured.skip_guards
        stances.clear()
        assert greedy(llm) == want
        assert stances and not any(stances)


def _quantized_qwen2(tmp_path: Path) -> Path:
    from anyquant.convert.quantize import quantize_checkpoint
    from anyquant.quant.formats.base import WriteOptions

    src = write_tiny_model(tmp_path / "src", "qwen2", seed=6)
    quantize_checkpoint(src, tmp_path / "gptq", "gptq", WriteOptions(bits=4, group_size=32))
    return tmp_path / "gptq"


def _repacked_kernels(llm: LLM) -> list[object]:
    """The C++ weight-only kernels (cpu_avx512 or cpu_avx2) of the model's linear layers."""
    from anyquant.layers.linear import QuantLinear
    from anyquant.quant.kernels.avx512 import RepackedWeightOnlyKernel

    return [
        m.kernel
        for m in llm.model.modules()
        if isinstance(m, QuantLinear) and isinstance(m.kernel, RepackedWeightOnlyKernel)
    ]


@pytest.mark.slow
def test_captured_step_calls_the_cpp_linear_kernels_without_python(tmp_path: Path) -> None:
    """The C++ weight-only kernels (cpu_avx512 or cpu_avx2, whichever this CPU runs) are traced
    into the captured step, which then calls their extension op directly: no `anyquant::opaque`
    op (a Python callback per linear layer and step) runs, and the tokens are the eager ones."""
    from torch.profiler import ProfilerActivity, profile

    path = _quantized_qwen2(tmp_path)
    eager = LLM(path, dtype="float32", max_model_len=64, max_num_seqs=4, enforce_eager=True)
    if not _repacked_kernels(eager):
        pytest.skip("no C++ weight-only kernel runs on this CPU: its layers stay opaque ops")
    prompts = [[256, 5, 6, 7], [256, 40, 41], [256, *range(60, 70)]]  # bucket 4
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in eager.generate(prompt_token_ids=prompts, sampling_params=params)]
    llm = LLM(path, dtype="float32", max_model_len=64, max_num_seqs=4, enforce_eager=True)
    kernels = _repacked_kernels(llm)
    memory = [k.packed.data_ptr() for k in kernels]  # type: ignore[attr-defined]
    assert llm.engine.runner.capture(63, 4, backend="aot_eager") is None
    captured = llm.engine.runner.captured
    assert captured is not None
    # Their tensors are now frozen parameters (which Dynamo does not check at every call, unlike
    # buffers) over the same memory: nothing was copied.
    assert [k.packed.data_ptr() for k in kernels] == memory  # type: ignore[attr-defined]
    for kernel in kernels:
        assert not dict(kernel.named_buffers())  # type: ignore[attr-defined]
        assert all(not p.requires_grad for p in kernel.parameters())  # type: ignore[attr-defined]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert got == want
    assert captured.steps_run >= 5
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("anyquant::opaque", 0) == 0
    assert sum(n for op, n in calls.items() if op.startswith("anyquant_cpu::")) > 0


@pytest.mark.slow
def test_buckets_whose_kernels_take_different_paths_get_their_own_function(tmp_path: Path) -> None:
    """A kernel that picks its path by row count (the vector kernel for few rows, a GEMM or
    tiles beyond) makes one graph per path: the buckets are grouped so that each compiled
    function holds one graph (and skips its guards), and every group's buckets take the same
    paths while neighbouring groups differ."""
    path = _quantized_qwen2(tmp_path)
    llm = LLM(path, dtype="bfloat16", max_model_len=64, max_num_seqs=32, enforce_eager=True)
    kernels = _repacked_kernels(llm)
    if not kernels:
        pytest.skip("no C++ weight-only kernel runs on this CPU: no kernel picks a path by rows")
    assert llm.engine.runner.capture(63, 32, backend="aot_eager") is None
    captured = llm.engine.runner.captured
    assert captured is not None
    groups = captured.groups
    assert [size for group in groups for size in group] == list(captured.buckets)
    assert groups[0] == (1,)

    # every traced kernel that picks its path by rows, the LM head's included (the bf16 head's
    # kernel changes paths at other row counts than the body's)
    from anyquant.layers.linear import QuantLinear

    by_rows = [
        m.kernel
        for m in llm.model.modules()
        if isinstance(m, QuantLinear) and callable(getattr(m.kernel, "path", None))
    ]
    assert len(by_rows) > len(kernels)  # the head is among them

    def paths(rows: int) -> list[str]:
        return [k.path(rows) for k in by_rows]  # type: ignore[attr-defined]

    for group in groups[1:]:
        assert all(paths(size) == paths(group[0]) for size in group)
    for before, after in itertools.pairwise(groups[1:]):
        assert paths(before[-1]) != paths(after[0])
    assert len(groups) >= 3  # these kernels change paths between 2 and 32 rows in bfloat16
    assert captured.graphs_per_function() == [1] * len(groups)
    assert captured.skip_guards
