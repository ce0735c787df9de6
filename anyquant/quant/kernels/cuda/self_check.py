"""A CUDA kernel's self-check on the device at hand, once per (kernel, device, spec, dtype).

The CUDA kernels lean on private torch ops (`_weight_int4pack_mm`, `_int_mm`, `_scaled_mm`) whose
layouts and constraints are torch's to change between releases and differ between GPUs. Before a
kernel is chosen for a layer on a real GPU, it loads a small weight of the layer's very spec,
multiplies and compares with the reference kernel's math; an exception or a wrong result makes
`cannot_run` refuse with the reason (`inspect` prints it) and the table falls through to the next
kernel (in the end cuda_dequant or the reference), so a torch that changed an op costs speed,
never correctness. Simulated devices (no GPU) skip it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.reference import reference_linear
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import weight_to_device
from anyquant.quant.weight_types import weight_traits

if TYPE_CHECKING:
    from anyquant.quant.kernels.base import LinearKernel

# Relative L2 error that counts as wrong: a mis-packed layout or a wrong scale is off by O(1);
# 16-bit rounding and fp8 activation codes flipped by it stay within a few percent.
WRONG = 0.1

_RESULTS: dict[tuple[str, str, QuantSpec, torch.dtype], str | None] = {}


def _probe_shape(spec: QuantSpec) -> tuple[int, int]:
    n, k = 64, 256
    if spec.granularity == "group":
        k = 2 * math.lcm(spec.group_size, 128)
    elif spec.granularity == "block":
        n, k = 2 * spec.block_shape[0], 2 * spec.block_shape[1]
    return n, k


def self_check(
    kernel: type[LinearKernel], spec: QuantSpec, compute_dtype: torch.dtype, device: torch.device
) -> str | None:
    """None when `kernel` computes a small layer of `spec` on `device` like the reference, else why not."""
    key = (kernel.name, str(device), spec, compute_dtype)
    if key not in _RESULTS:
        _RESULTS[key] = _run(kernel, spec, compute_dtype, device)
    return _RESULTS[key]


def _run(
    kernel: type[LinearKernel], spec: QuantSpec, compute_dtype: torch.dtype, device: torch.device
) -> str | None:
    gen = torch.Generator().manual_seed(0)
    n, k = _probe_shape(spec)
    weight = quantize_rtn(torch.randn(n, k, generator=gen) * 0.05, spec)
    act = spec.act
    if act is not None and not act.dynamic:  # a static scale that spans inputs of a few units
        weight = replace(weight, input_scale=torch.tensor([3.0 / weight_traits(act.type).code_max]))
        if not act.symmetric:
            weight = replace(weight, input_zero=torch.tensor([-7], dtype=torch.int32))
    x = torch.randn(5, k, generator=gen).to(compute_dtype)
    try:
        instance = kernel((n, k), compute_dtype)
        instance.load(weight_to_device(weight, device) if kernel.load_on_device else weight)
        got = instance.to(device)(x.to(device)).float().cpu()
    except Exception as error:  # any failure of the op means: do not use this kernel here
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return f"failed its self-check on this device (torch {torch.__version__}): {type(error).__name__}: {first}"
    want = reference_linear(x, weight, None, torch.float32)
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
    if not err < WRONG:  # also catches NaN
        return f"failed its self-check on this device (torch {torch.__version__}): relative error {err:.2g}"
    return None
