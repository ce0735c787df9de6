"""The CUDA kernels through the whole loader (merged q/k/v and gate/up, biases, act-order, static
and dynamic activation scales, padding), on CPU: the kernels whose ops have CPU implementations
(plain torch, `torch._int_mm`, `torch._scaled_mm`) are let onto the CPU for this test and forced
with `kernel=`, under a simulated H100, and the logits held to the reference kernel's. What this
cannot show is the CUDA ops themselves: tests/cuda/ does, on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.quant.kernels.cuda import CudaDequantKernel, CudaFp8ScaledMMKernel, CudaW8A8Int8Kernel
from anyquant.quant.kernels.cuda.base import CudaKernel
from anyquant.utils.devices import simulated_cuda
from anyquant.utils.tiny_model import write_tiny_model
from tests.loading.test_formats_end_to_end import FORMATS, IDS

pytestmark = pytest.mark.slow

# format -> (kernel forced, compute dtype, budget on the relative L2 of the logits vs the reference
# kernel in float32). fp32: summation order only, but activation codes can flip on it (int8 ties
# at amax / 127.5: the loading tests' 2e-2). Row-wise fp8 runs in bf16: every activation rounded
# to bf16 moves fp8 codes (12.5 % apart), as tests/cuda budgets (0.15; 7-9e-2 measured).
CASES = {
    "awq-g32": ("cuda_dequant", torch.float32, 1e-5),
    "gptq-3bit-asym-actorder": ("cuda_dequant", torch.float32, 1e-5),
    "gptq-v2-8bit-channel": ("cuda_dequant", torch.float32, 1e-5),
    "ct-fp8-block": ("cuda_dequant", torch.float32, 1e-5),
    "ct-w8a8": ("cuda_w8a8_int8", torch.float32, 2e-2),
    "lmdeploy-int8": ("cuda_w8a8_int8", torch.float32, 5e-3),
    "fp8-tensor": ("cuda_fp8_scaled_mm", torch.float32, 2e-2),
    "fbgemm-fp8": ("cuda_fp8_scaled_mm", torch.bfloat16, 0.15),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("dense"), "qwen2", seed=7, hidden_size=128, head_dim=32, intermediate_size=256
    )


@pytest.fixture
def cuda_kernels_on_cpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for cls in (CudaDequantKernel, CudaW8A8Int8Kernel, CudaFp8ScaledMMKernel):
        monkeypatch.setattr(cls, "device_types", ("cuda", "cpu"))
    with simulated_cuda((9, 0), "H100"):
        yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_cuda_kernel_through_the_loader(
    dense: Path, tmp_path: Path, fmt: str, cuda_kernels_on_cpu: None
) -> None:
    kernel, dtype, budget = CASES[fmt]
    writer, options, _ = FORMATS[fmt]
    path = tmp_path / fmt
    quantize_checkpoint(dense, path, writer, options)
    llm = LLM(str(path), dtype=str(dtype).removeprefix("torch."), kernel=kernel, max_num_seqs=2)
    used = {m.kernel.name for m in llm.model.modules() if isinstance(getattr(m, "kernel", None), CudaKernel)}
    assert used == {kernel}
    want = LLM(str(path), dtype="float32", kernel="reference", max_num_seqs=2).logits(IDS)
    assert _rel(llm.logits(IDS), want) < budget
