"""What the CUDA kernels share: the capability check and the output's finish (the weight check
and the padding arithmetic every kernel shares are kernels/base.py's `check_weight`, `round_up`).

`cannot_run` is the shared pre-check (device, role, dtype: kernels/base.py) followed by the
device's compute capability (`min_capability`, from `utils/devices.cuda_properties`, which a
simulated device answers on machines without a GPU) and the kernel's own `rejects_on`, which
also sees the device's properties (fp8 row-wise scales need sm90, say), then, on a real GPU, the
kernel's self-check for the layer's spec (self_check.py: torch's private ops may change). Every
reason is a sentence, because `anyquant inspect` prints it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from anyquant.quant.kernels.base import LinearKernel, precheck
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.utils.devices import CudaProperties, cuda_properties, cuda_unavailable_reason

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CudaKernel(LinearKernel):
    """Base of the kernels in this package: CUDA only, repacked on the GPU (`load_on_device`)."""

    device_types = ("cuda",)
    load_on_device = True
    compute_dtypes: ClassVar[tuple[torch.dtype, ...] | None] = FLOAT_DTYPES
    applies_offsets = False
    min_capability: ClassVar[tuple[int, int]] = (7, 0)
    why_capability: ClassVar[str] = ""  # what the minimum is for, for the rejection sentence

    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        reason = precheck(cls, spec, kind, device, shape, compute_dtype)
        if reason is not None or spec is None:
            return reason
        unavailable = cuda_unavailable_reason(device)
        if unavailable is not None:
            return unavailable
        props = cuda_properties(device)
        reason = cls.rejects_on(spec, shape, compute_dtype, props)
        if reason is None and not props.simulated:
            from anyquant.quant.kernels.cuda.self_check import self_check

            reason = self_check(cls, spec, compute_dtype, device)
        return reason

    @classmethod
    def rejects_on(
        cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype, props: CudaProperties
    ) -> str | None:
        """Why this kernel cannot serve the layer on a device with `props`, or None."""
        if props.capability < cls.min_capability:
            need = f"{cls.min_capability[0]}.{cls.min_capability[1]}"
            why = f" ({cls.why_capability})" if cls.why_capability else ""
            return f"needs compute capability {need} or newer{why}; {props.describe()}"
        return cls.rejects(spec, shape, compute_dtype)


def finish(y: Tensor, n: int, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Drop padded output columns, add the bias once (in fp32 when y is fp32), cast to `dtype`."""
    if y.shape[1] != n:
        y = y[:, :n]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype).contiguous()


def on_host(t: Tensor | None) -> Tensor | None:
    """A small index tensor on the CPU, for host-side checks (act-order permutations) that compare
    it with CPU tensors; the result goes back to the device."""
    return None if t is None else t.cpu()
