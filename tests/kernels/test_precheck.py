"""The shared kernel pre-check (`quant/kernels/base.py: precheck`): each kernel's declared
requirements turn into the same sentences, in the same order, for every kernel that declares them."""

from __future__ import annotations

import pytest
import torch

from anyquant.quant.registry import kernel_classes
from anyquant.quant.spec import QuantSpec

CPU, META = torch.device("cpu"), torch.device("meta")
U4 = QuantSpec("uint4", "group", group_size=32, has_zero=True)
U4_OFFSET = QuantSpec("uint4", "group", group_size=32, has_offset=True)


def kernel(name: str):  # type: ignore[no-untyped-def]
    return next(k for k in kernel_classes() if k.name == name)


def test_reference_runs_every_quantized_matmul_anywhere() -> None:
    ref = kernel("reference")
    for kind in ("linear", "experts", "lm_head", "router"):
        assert ref.cannot_run(U4, kind, META, (64, 64), torch.float64) is None
    assert ref.cannot_run(U4_OFFSET, "linear", CPU, (64, 64), torch.float32) is None
    assert ref.cannot_run(U4, "linear", CPU, (0, 64), torch.float32) is None  # empty shapes too
    assert ref.cannot_run(None, "linear", CPU, (64, 64), torch.float32) == (
        "layer is unquantized (the dense kernel runs it)"
    )
    assert ref.cannot_run(U4, "embedding", CPU, (64, 64), torch.float32) == (
        "embedding layers are not matrix multiplications (looked up, dequantized at load)"
    )


def test_dense_runs_every_unquantized_layer() -> None:
    dense = kernel("dense")
    for kind in ("linear", "experts", "lm_head", "router", "embedding"):
        assert dense.cannot_run(None, kind, META, (0, 64), torch.float64) is None
    assert dense.cannot_run(U4, "linear", CPU, (64, 64), torch.float32) == "layer is quantized"


@pytest.mark.parametrize("name", ["cpu_int4", "cpu_int8_weight", "cpu_w8a8_int8", "cpu_fp8_dequant"])
def test_torch_cpu_kernels_share_their_requirements(name: str) -> None:
    k = kernel(name)
    assert (
        k.cannot_run(U4, "linear", META, (64, 64), torch.float32) == "runs on CPU only, the layer is on meta"
    )
    assert k.cannot_run(U4, "router", CPU, (64, 64), torch.float32) == (
        "MoE routers keep the reference kernel's fp32 dequantize-then-matmul (routing flips on tiny differences)"
    )
    assert k.cannot_run(U4, "linear", CPU, (64, 64), torch.float64) == (
        "compute dtype torch.float64 is not float32, bfloat16 or float16"
    )
    assert k.cannot_run(U4, "linear", CPU, (64, 0), torch.float32) == "layer shape [64, 0] has no weights"
    assert k.cannot_run(U4_OFFSET, "linear", CPU, (64, 64), torch.float32) == (
        f"float offsets per group (GGUF minimums) are not applied by {name}"
    )
