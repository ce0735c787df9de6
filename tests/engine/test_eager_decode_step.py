"""The eager decode step's attention layers as one C++ call each (`anyquant_cpu::paged_decode_step`,
K/V store and decode attention), as in the captured step, wherever the kernel can run.

Checked by the op names the torch profiler records (never by timings): a step where every
sequence decodes one token calls the op once per layer after one `check_decode_step`, and nothing
else stores or attends; prefill, a decode step mixed with a prefill chunk, and the pure-torch
setting keep the older path. The outputs are compared with float64 attention by its definition,
and whole engines (dense GQA, a sliding window, DeepSeek's latent cache) give the same logits at
every step eagerly, captured, and on the pure-torch attention, over contexts that grow across
page boundaries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from anyquant import LLM, SamplingParams
from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.layers import decode_kernel
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.attention_reference import causal_attention_float64

STEP_OP = "anyquant_cpu::paged_decode_step"
CHECK_OP = "anyquant_cpu::check_decode_step"
# The older path's store and kernel: a one-call layer runs neither.
OLD_OPS = ("aten::index_copy_", "anyquant_cpu::paged_decode_attention")
PAGE = 4
# (pages, tokens cached before the step) of three sequences, pages scattered over the cache
SEQUENCES = [([5, 17, 2, 30, 11], 18), ([9, 3, 21, 7], 13), ([12, 25], 4)]


def _kernel_runs() -> None:
    reason = decode_kernel._cpu_reason()
    if reason is not None:
        pytest.skip(reason)


def _op_calls(fn: Callable[[], Any]) -> tuple[Any, Counter[str]]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, Counter({e.key: e.count for e in prof.key_averages()})


def _slots(pages: list[int], positions: range) -> torch.Tensor:
    return torch.tensor([pages[p // PAGE] * PAGE + p % PAGE for p in positions])


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("value_in_key", [False, True])
def test_decode_step_is_one_call_per_layer_and_matches_float64(
    value_in_key: bool, window: int | None
) -> None:
    """Three decoding sequences, three layers: one check for the step, one op call per layer, no
    other store or attention; each layer's new key/value lands in its slot, and the output is
    float64 attention over the sequence's keys (within the window). A latent cache (the value
    is the key's first 32 of 48 values) stores the key alone."""
    _kernel_runs()
    torch.manual_seed(0)
    layers, hkv, h, dk = 3, 2, 6, 48
    dv = 32 if value_in_key else 48
    cache = PagedKVCache(layers, 32, PAGE, hkv, dk, dv, torch.float32, value_in_key=value_in_key)
    cache.k.normal_()
    cache.v.normal_()
    q, k, v = torch.randn(layers, 3, h, dk), torch.randn(layers, 3, hkv, dk), torch.randn(layers, 3, hkv, dv)
    if value_in_key:
        v = k[..., :dv]

    def step() -> list[torch.Tensor]:
        ctx = PagedAttention.for_sequences(cache, [(p, c, 1) for p, c in SEQUENCES])
        assert ctx.step_tensors is not None
        return [ctx.attend(i, q[i], k[i], v[i], dk**-0.5, window) for i in range(layers)]

    outs, calls = _op_calls(step)
    assert calls[STEP_OP] == layers and calls[CHECK_OP] == 1
    assert not any(calls[op] for op in OLD_OPS), calls
    for layer, out in enumerate(outs):
        assert out.shape == (3, h * dv)
        for b, (pages, cached) in enumerate(SEQUENCES):
            slots = _slots(pages, range(cached + 1))
            keys = cache.k[layer][:, slots].transpose(0, 1)
            values = cache.v[layer][:, slots].transpose(0, 1)
            assert torch.equal(keys[-1], k[layer, b]) and torch.equal(values[-1], v[layer, b])
            want = causal_attention_float64(
                q[layer, b : b + 1], keys, values, cached + 1, window
            )  # scale dk**-0.5
            assert torch.allclose(out[b : b + 1].double(), want, atol=1e-5)


def test_other_steps_keep_the_older_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode row beside a prefill chunk, a prefill alone, widths the kernel does not take and
    the pure-torch setting store and attend as before: the one-call op never runs."""
    _kernel_runs()
    torch.manual_seed(1)
    cache = PagedKVCache(1, 32, PAGE, 2, 16, 16, torch.float32)
    narrow = PagedKVCache(1, 32, PAGE, 2, 8, 8, torch.float32)
    decode = [(p, c, 1) for p, c in SEQUENCES]
    cases = [
        (cache, [([5, 17, 2, 30, 11], 18, 1), ([9, 3, 21, 7], 10, 3)]),  # decode + prefill chunk
        (cache, [([12, 25], 0, 6)]),  # a prompt
        (narrow, decode),  # widths not multiples of 16
    ]
    for target, seqs in cases:
        ctx = PagedAttention.for_sequences(target, seqs)
        assert ctx.step_tensors is None
        t, d = sum(n for _, _, n in seqs), target.k.shape[-1]
        args = (torch.randn(t, 4, d), torch.randn(t, 2, d), torch.randn(t, 2, d))
        _, calls = _op_calls(lambda ctx=ctx, args=args, d=d: ctx.attend(0, *args, d**-0.5))
        assert calls[STEP_OP] == 0 and calls["aten::index_copy_"] >= 2  # the K/V store, at least
    monkeypatch.setattr(decode_kernel._Setting, "mode", "torch")
    assert cache.step_kernel_reason() == "ANYQUANT_DECODE_ATTENTION=torch"
    assert PagedAttention.for_sequences(cache, decode).step_tensors is None


def test_a_bad_block_table_is_refused_once_for_the_step() -> None:
    _kernel_runs()
    cache = PagedKVCache(1, 8, PAGE, 2, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="page id 40 outside the cache's 8 pages"):
        PagedAttention(cache, torch.tensor([1]), torch.tensor([[40]]), [1], [2])
    with pytest.raises(RuntimeError, match=r"slot_mapping\[0\] = 32 outside the cache's 32 slots"):
        PagedAttention(cache, torch.tensor([32]), torch.tensor([[1]]), [1], [2])


def _deepseek(path: Path) -> Path:
    from tests.models.test_deepseek_vs_transformers import CASES, write_deepseek

    version, overrides = CASES["v3"]
    return write_deepseek(path, version, overrides)


FAMILIES: dict[str, Callable[[Path], Path]] = {
    "qwen2-gqa": lambda p: write_tiny_model(p, "qwen2", seed=2),  # 4 query heads on 2 KV heads
    # A window shorter than the contexts: the kernel reads only the window's pages.
    "mistral-sliding-window": lambda p: write_tiny_model(p, "mistral", seed=4, sliding_window=7),
    "deepseek-mla": _deepseek,  # the latent cache: the value is the key's prefix
}
# 3 sequences (bucket 4 when captured); 24 new tokens take the contexts across pages of 16.
PROMPTS = [[256, 5, 6, 7, 8, 9], [256, 40, 41], [256, *range(60, 90)]]
NEW_TOKENS = 24


def _recorded_steps(llm: LLM) -> tuple[list[torch.Tensor], list[bool]]:
    """Greedy generation; every step's logits and whether every sequence of it decoded."""
    runner = llm.engine.runner
    logits: list[torch.Tensor] = []
    decoding: list[bool] = []
    execute = runner.execute

    def recording(plan: Any) -> Any:
        decoding.append(all(n == 1 for _, n in plan.scheduled))
        out = execute(plan)
        logits.append(out.logits.clone())
        return out

    runner.execute = recording  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
    runner.execute = execute  # type: ignore[method-assign]
    return logits, decoding


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_eager_captured_and_torch_attention_give_the_same_logits(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32 engines on one checkpoint, step by step: the eager step (every decode step's layers
    one `paged_decode_step` call each: counted), the captured step, and the eager step on the
    pure-torch attention (no such call)."""
    _kernel_runs()
    path = FAMILIES[family](tmp_path / family)

    def engine() -> LLM:
        return LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True)

    eager = engine()
    (logits, decoding), calls = _op_calls(lambda: _recorded_steps(eager))
    layers = eager.model.args.num_layers
    assert sum(decoding) >= NEW_TOKENS - 1
    assert calls[STEP_OP] == layers * sum(decoding) and calls[CHECK_OP] == sum(decoding)

    compiled = engine()
    assert compiled.engine.runner.capture(127, 4, backend="aot_eager") is None
    captured = compiled.engine.runner.captured
    assert captured is not None and captured.attention_reason is None
    warm_up = captured.steps_run
    captured_logits, captured_decoding = _recorded_steps(compiled)
    assert captured.steps_run - warm_up == sum(decoding) and captured_decoding == decoding

    with monkeypatch.context() as torch_path:
        torch_path.setattr(decode_kernel._Setting, "mode", "torch")
        (torch_logits, torch_decoding), torch_calls = _op_calls(lambda: _recorded_steps(engine()))
    assert torch_calls[STEP_OP] == 0 and torch_decoding == decoding

    for step, want in enumerate(torch_logits):
        assert torch.allclose(logits[step], want, rtol=1e-4, atol=1e-4), (step, family)
        assert torch.allclose(captured_logits[step], want, rtol=1e-4, atol=1e-4), (step, family)
