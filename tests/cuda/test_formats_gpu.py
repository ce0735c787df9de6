"""Every output format's fixture (the tiny models of tests/loading/test_formats_end_to_end.py)
reproduces its CPU reference logits on CUDA in float16 and bfloat16, and one device on CUDA (TP 1)
equals the CPU in float32; TP 2 over NCCL when two GPUs are visible.

Reference: the same checkpoint on CPU in float32 through the reference kernel (itself held to
transformers on float64-dequantized weights by the loading tests). Budgets (relative L2 of the
logits over 16 tokens): float32 on CUDA 1e-4 (summation order only; TF32 is off by default).
In 16 bits every activation is rounded to the 16-bit type: weight-only schemes 5e-3 in float16
and 2.5e-2 in bfloat16 (measured on CPU in the same dtypes: 1.6e-3 and 1.1e-2). Activation-quantized
schemes move activations to a neighbouring code on a rounding difference (1/127 of the range for
int8, 12.5 % for fp8 e4m3) and the flips propagate: int8 6e-2, fp8 0.15 in either dtype
(measured on CPU: up to 3.2e-2 and 8.8e-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.utils.tiny_model import write_tiny_model
from tests.cuda import DEVICE
from tests.helpers.errors import rel_err
from tests.loading.test_formats_end_to_end import FORMATS, IDS

WEIGHT_ONLY_BUDGET = {torch.float16: 5e-3, torch.bfloat16: 2.5e-2}
ACT_BUDGET = {"int8": 6e-2, "fp8": 0.15}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Sizes multiples of 128, as in the loading tests, so 128-wide blocks and groups apply.
    return write_tiny_model(
        tmp_path_factory.mktemp("dense"), "qwen2", seed=7, hidden_size=128, head_dim=32, intermediate_size=256
    )


@pytest.fixture(scope="module")
def quantized(dense: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, (writer, options, _) in FORMATS.items():
        out[name] = root / name
        quantize_checkpoint(dense, out[name], writer, options)
    return out


def _cpu_reference(path: Path) -> torch.Tensor:
    return LLM(str(path), device="cpu", dtype="float32", kernel="reference").logits(IDS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_on_cuda_matches_cpu_reference(
    quantized: dict[str, Path], fmt: str, dtype: torch.dtype
) -> None:
    path = quantized[fmt]
    want = _cpu_reference(path)
    llm = LLM(str(path), device=str(DEVICE), dtype=str(dtype).removeprefix("torch."), max_num_seqs=4)
    kernels = sorted({m.kernel.name for m in llm.model.modules() if getattr(m, "kernel", None) is not None})
    got = llm.logits(IDS)
    assert got.shape == want.shape and bool(torch.isfinite(got).all()), kernels
    act = FORMATS[fmt][2]
    budget = WEIGHT_ONLY_BUDGET[dtype] if act is None else ACT_BUDGET[act[0]]
    err = rel_err(got, want)
    print(f"{fmt} {dtype}: rel-L2 {err:.2e} kernels {kernels}")
    assert err < budget, f"{fmt} {dtype}: rel-L2 {err:.2e} >= {budget} (kernels {kernels})"


# float32 on both sides: weight-only formats agree to summation order; activation-quantized ones
# may flip an activation code on a last-bit difference (the loading tests' budgets: int8 5e-3,
# fp8 2e-2), and then greedy tokens need not agree, so only weight-only formats compare tokens.
TP1_BUDGET = {None: 1e-4, "int8": 5e-3, "fp8": 2e-2}


@pytest.mark.parametrize("fmt", ["awq-g32", "gptq-3bit-asym-actorder", "lmdeploy-int8", "fp8-tensor"])
def test_tp1_on_cuda_equals_cpu_in_float32(quantized: dict[str, Path], fmt: str) -> None:
    path = quantized[fmt]
    act = FORMATS[fmt][2]
    cpu = LLM(str(path), device="cpu", dtype="float32", kernel="reference", max_num_seqs=4)
    gpu = LLM(str(path), device=str(DEVICE), dtype="float32", max_num_seqs=4)
    assert rel_err(gpu.logits(IDS), cpu.logits(IDS)) < TP1_BUDGET[None if act is None else act[0]]
    if act is not None:
        return
    # The engine end to end (paged KV cache, scheduler, sampling) on the GPU: the same greedy tokens.
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [IDS[:5], IDS[:9], IDS]
    want = [o.token_ids for o in cpu.generate([{"prompt_token_ids": p} for p in prompts], params)]
    got = [o.token_ids for o in gpu.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert got == want


@pytest.mark.skipif(
    DEVICE.type != "cuda" or torch.cuda.device_count() < 2, reason="TP 2 needs two visible GPUs"
)
def test_tp2_over_nccl_equals_tp1(quantized: dict[str, Path]) -> None:
    path = quantized["awq-g32"]
    one = LLM(str(path), device=str(DEVICE), dtype="float32").logits(IDS)
    with LLM(str(path), device=str(DEVICE), dtype="float32", tensor_parallel_size=2) as two:
        assert rel_err(two.logits(IDS), one) < 1e-4
