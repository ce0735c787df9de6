"""MoE checkpoints on int8 activations: every block's routed experts run as one fused int8 call
(`moe_experts_vnni` on AVX512-VNNI CPUs, `moe_experts_avx2_a8` on AVX2 ones).

On the committed third-party MoE fixtures (llm-compressor W4A16 asym, GPTQModel act-order and 8-bit
with shared experts, AutoAWQ-style GEMM, llm-compressor W8A8 int8):
- weight-only checkpoints loaded with `activation_dtype="int8"` and W8A8 ones get
  `FusedInt8Experts` in every MoE block, on this CPU's call (before, one `cpu_avx512_vnni` or
  `cpu_avx2_a8` expert at a time);
- in float32 the whole model equals the reference kernels running the same definition (the
  reference's activation quantization of x and h): measured 3.4e-7, budget 1e-4 (a code that
  flips on a rounding boundary stays far below it);
- W8A8, and weight-only loaded with int8 activations: the fused call equals the per-expert path
  over the same kernels (the same int32 sums; in bfloat16 the per-expert path rounds each
  projection's output and h to bf16, so there a few h codes flip: budget 2e-2, measured below);
- the cost of int8 activations against the checkpoint's own bf16 numerics: logits move by
  1.5e-2 to 3.3e-2 relative (measured on these tiny random models), budget 5e-2, and visibly
  (> 1e-3), so the test would notice the option silently not applying.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.layers.moe import SparseMoE
from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512_moe_vnni import INT8_OPS, FusedInt8Experts
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel
from anyquant.quant.spec import ActQuant, QuantSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "third_party_moe"
WEIGHT_ONLY = [
    "qwen3moe-w4a16-g32-asym-gptq-llmc",
    "qwen3moe-gptq-4bit-g32-sym-descact-gptqmodel",
    "qwen2moe-gptq-8bit-g64-sym-gptqmodel",
]
IDS = [5, 99, 300, 17, 4, 100, 250, 7, 42, 3, 77, 12, 200, 6, 8, 9]
_W4A8 = QuantSpec("uint4", "group", group_size=32, act=ActQuant("int8", True))
# The int8-activation kernel the registry picks on this CPU (VNNI ranks above AVX2), or why none.
_REASONS = {
    cls: cls.cannot_run(_W4A8, "experts", torch.device("cpu"), (64, 64), torch.bfloat16)
    for cls in (Avx512VnniKernel, Avx2Int8ActivationKernel)
}
KERNEL = next((cls for cls, reason in _REASONS.items() if reason is None), None)
pytestmark = pytest.mark.skipif(
    KERNEL is None, reason=f"no int8-activation kernel runs here: {'; '.join(map(str, _REASONS.values()))}"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _fused_calls(llm: LLM) -> set[str]:
    """The fused calls of every MoE block: class and op, or why a block is not fused."""
    return {
        f"{type(m.fused).__name__} {getattr(m.fused, 'op_name', m.fused_reason)}"
        for m in llm.model.modules()
        if isinstance(m, SparseMoE)
    }


def _expected_call() -> set[str]:
    assert KERNEL is not None
    return {f"{FusedInt8Experts.__name__} {INT8_OPS[KERNEL]}"}


def _per_expert_logits(llm: LLM) -> torch.Tensor:
    """The model's logits with every block on the per-expert path (same kernels), then fused again."""
    blocks = [m for m in llm.model.modules() if isinstance(m, SparseMoE)]
    fused = [b.fused for b in blocks]
    for block in blocks:
        block.fused = None
    try:
        return llm.logits(IDS)
    finally:
        for block, call in zip(blocks, fused):
            block.fused = call


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_int8_activation_experts_are_fused_and_equal_the_reference(name: str) -> None:
    path = FIXTURES / name
    fast = LLM(path, dtype="float32", activation_dtype="int8")
    assert _fused_calls(fast) == _expected_call()
    reference = LLM(path, dtype="float32", activation_dtype="int8", kernel="reference")
    assert _rel(fast.logits(IDS), reference.logits(IDS)) < 1e-4


def test_int8_activations_cost_against_bf16() -> None:
    path = FIXTURES / WEIGHT_ONLY[0]
    stored = LLM(path, dtype="bfloat16").logits(IDS).float()
    int8 = LLM(path, dtype="bfloat16", activation_dtype="int8").logits(IDS).float()
    assert 1e-3 < _rel(int8, stored) < 5e-2, _rel(int8, stored)


def test_w8a8_experts_are_fused() -> None:
    llm = LLM(FIXTURES / "qwen3moe-w8a8int8-gptq-llmc", dtype="float32")
    assert _fused_calls(llm) == _expected_call()
    assert _rel(llm.logits(IDS), _per_expert_logits(llm)) < 1e-6


@pytest.mark.parametrize(("dtype", "budget"), [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_fused_int8_logits_equal_the_per_expert_path(dtype: str, budget: float) -> None:
    """A tiny Qwen3-MoE (W4A16 asym g32, loaded with int8 activations): fused against per-expert
    over the same kernels. float32: the same int32 sums and scales, only h's silu may round
    differently; bfloat16: the per-expert path rounds gate, up, h and down to bf16 (see the top)."""
    llm = LLM(FIXTURES / WEIGHT_ONLY[0], dtype=dtype, activation_dtype="int8")
    assert _fused_calls(llm) == _expected_call()
    fused, per_expert = llm.logits(IDS).float(), _per_expert_logits(llm).float()
    assert _rel(fused, per_expert) < budget, _rel(fused, per_expert)


@pytest.mark.slow
def test_captured_decode_step_traces_the_int8_calls() -> None:
    """The compiled decode step captures the fused int8 call and the VNNI linear layers whole
    (through their fake implementations) and picks the eager engine's greedy tokens."""
    from anyquant import SamplingParams

    path = FIXTURES / WEIGHT_ONLY[1]
    prompts = [[5, 6, 7, 8, 9], [40, 41], list(range(60, 90))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def greedy(llm: LLM) -> list[list[int]]:
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

    options = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 4, "activation_dtype": "int8"}
    eager = LLM(path, enforce_eager=True, **options)  # type: ignore[arg-type]
    compiled = LLM(path, enforce_eager=True, **options)  # type: ignore[arg-type]
    assert compiled.engine.runner.capture(127, 4, backend="aot_eager") is None  # no graph break
    assert greedy(compiled) == greedy(eager)
    captured = compiled.engine.runner.captured
    assert captured is not None and captured.steps_run >= 7


@pytest.mark.parametrize("name", [WEIGHT_ONLY[0], "qwen3moe-w8a8int8-gptq-llmc"])
def test_inspect_names_this_cpus_int8_call(name: str) -> None:
    """`inspect` (headers only) predicts the fused int8 call the loader builds, named by the kernel
    this CPU's experts run on (cpu_avx2_a8 -> moe_experts_avx2_a8 on AVX2 CPUs)."""
    from anyquant.loading.describe import describe_checkpoint
    from anyquant.quant.kernels.avx512_moe import FUSED_CALLS

    assert KERNEL is not None
    path = FIXTURES / name
    docs = describe_checkpoint(path, dtype="bfloat16", activation_dtype="int8")["moe_layers"]
    assert docs and all(d["fused"] and d["call"] == FUSED_CALLS[KERNEL.name] for d in docs), docs
    assert FUSED_CALLS[KERNEL.name].startswith(INT8_OPS[KERNEL])
    assert _fused_calls(LLM(path, dtype="bfloat16", activation_dtype="int8")) == _expected_call()
