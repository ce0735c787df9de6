"""MoE checkpoints on int8 activations: every block's routed experts run as one fused VNNI call.

On the committed third-party MoE fixtures (llm-compressor W4A16 asym, GPTQModel act-order and 8-bit
with shared experts, AutoAWQ-style GEMM, llm-compressor W8A8 int8):
- weight-only checkpoints loaded with `activation_dtype="int8"` and W8A8 ones get
  `FusedInt8Experts` in every MoE block (before, one `cpu_avx512_vnni` expert at a time);
- in float32 the whole model equals the reference kernels running the same definition (the
  reference's activation quantization of x and h): measured 3.4e-7, budget 1e-4 (a code that
  flips on a rounding boundary stays far below it);
- W8A8: the fused call equals the per-expert path over the same kernels;
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
from anyquant.quant.kernels.avx512_moe_vnni import FusedInt8Experts
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel
from anyquant.quant.spec import ActQuant, QuantSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "third_party_moe"
WEIGHT_ONLY = [
    "qwen3moe-w4a16-g32-asym-gptq-llmc",
    "qwen3moe-gptq-4bit-g32-sym-descact-gptqmodel",
    "qwen2moe-gptq-8bit-g64-sym-gptqmodel",
]
IDS = [5, 99, 300, 17, 4, 100, 250, 7, 42, 3, 77, 12, 200, 6, 8, 9]
UNAVAILABLE = Avx512VnniKernel.cannot_run(
    QuantSpec("uint4", "group", group_size=32, act=ActQuant("int8", True)),
    "experts",
    torch.device("cpu"),
    (64, 64),
    torch.bfloat16,
)
pytestmark = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"cpu_avx512_vnni cannot run here: {UNAVAILABLE}"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _fused_calls(llm: LLM) -> set[str]:
    return {type(m.fused).__name__ for m in llm.model.modules() if isinstance(m, SparseMoE)}


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_int8_activation_experts_are_fused_and_equal_the_reference(name: str) -> None:
    path = FIXTURES / name
    fast = LLM(path, dtype="float32", activation_dtype="int8")
    assert _fused_calls(fast) == {FusedInt8Experts.__name__}
    reference = LLM(path, dtype="float32", activation_dtype="int8", kernel="reference")
    assert _rel(fast.logits(IDS), reference.logits(IDS)) < 1e-4


def test_int8_activations_cost_against_bf16() -> None:
    path = FIXTURES / WEIGHT_ONLY[0]
    stored = LLM(path, dtype="bfloat16").logits(IDS).float()
    int8 = LLM(path, dtype="bfloat16", activation_dtype="int8").logits(IDS).float()
    assert 1e-3 < _rel(int8, stored) < 5e-2, _rel(int8, stored)


def test_w8a8_experts_are_fused() -> None:
    llm = LLM(FIXTURES / "qwen3moe-w8a8int8-gptq-llmc", dtype="float32")
    assert _fused_calls(llm) == {FusedInt8Experts.__name__}
    fused = llm.logits(IDS)
    for block in llm.model.modules():
        if isinstance(block, SparseMoE):
            block.fused = None  # the per-expert path over the same cpu_avx512_vnni kernels
    assert _rel(fused, llm.logits(IDS)) < 1e-6


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
