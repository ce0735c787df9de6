"""The compute dtype a device can run, and the fp16 policy for models trained in another dtype.

Owns what `dtype=auto` means on a GPU without bf16 (compute capability < 8.0, e.g. a T4: fp16,
guarded), the refusal of an explicit bfloat16 there, and the risk lines `inspect` prints before
anything is loaded. The guard itself (fp32 outputs of the residual projections, per-layer
overflow detection at warm-up) lives in `engine/fp16_guard.py`; this module only decides.
"""

from __future__ import annotations

import logging

import torch

from anyquant.errors import UnsupportedError
from anyquant.utils.devices import cuda_properties

log = logging.getLogger(__name__)

FP16_MAX = 65504.0


def device_compute_dtype(
    chosen: torch.dtype, trained: torch.dtype, requested_auto: bool, device: torch.device
) -> torch.dtype:
    """`chosen` (from the request and the checkpoint) adjusted to what `device` can run.

    On a CUDA device without bf16, `auto` for a bf16-trained model becomes float16 (the fp16
    policy then guards it) and an explicit bfloat16 is refused with the alternatives; fp8/int
    kernels are chosen later, per layer. Every other device and dtype is returned unchanged."""
    if device.type != "cuda" or chosen != torch.bfloat16:
        return chosen
    props = cuda_properties(device)
    if props.has_bf16:
        return chosen
    if not requested_auto:
        raise UnsupportedError(
            f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer; {props.describe()} has no "
            "bf16 tensor cores. Use dtype float16 (residual stream and norms stay fp32, overflow is "
            "checked per layer at warm-up) or float32"
        )
    log.warning(
        "%s has no bf16: this %s-trained model runs in float16 compute with an fp32 residual stream, "
        "fp32 norms and fp32 accumulation; layers that come near fp16's limit are found at warm-up",
        props.describe(),
        str(trained).removeprefix("torch."),
    )
    return torch.float16


def needs_fp16_guard(compute_dtype: torch.dtype, trained: torch.dtype) -> bool:
    """fp16 compute for a model whose activations were never bounded by fp16's range (trained in
    bf16 or fp32): the warm-up must look for layers that overflow it."""
    return compute_dtype == torch.float16 and trained != torch.float16


def dtype_risks(
    compute_dtype: torch.dtype, trained: torch.dtype, device: torch.device, tensor_parallel: int = 1
) -> list[str]:
    """What `inspect` warns about before loading, for this compute dtype on this device."""
    risks: list[str] = []
    if needs_fp16_guard(compute_dtype, trained):
        what = f"{str(trained).removeprefix('torch.')}-trained model"
        if device.type == "cuda" and not cuda_properties(device).has_bf16:
            what += f" runs in float16 on {cuda_properties(device).describe()}, which has no bf16,"
        else:
            what += " asked to run in float16"
        if tensor_parallel == 1:
            guard = (
                "the residual projections (o_proj, down_proj) and the MLP are range-guarded; warm-up names the "
                "first layer that still overflows (--debug-numerics shows every guarded layer's headroom)"
            )
        else:
            guard = (
                "under tensor parallelism only the per-step check runs: non-finite logits fail the request "
                "(--debug-numerics names the first overflowing layer)"
            )
        risks.append(
            f"{what}: activations beyond {FP16_MAX:.0f} overflow. The residual stream, norms and accumulation "
            f"stay fp32; {guard}; float32 avoids the risk"
        )
    return risks


def overflow_advice(device: torch.device) -> str:
    """The dtypes to suggest after an overflow: bfloat16 only where the device has it."""
    if device.type == "cuda" and not cuda_properties(device).has_bf16:
        return "float32"
    return "float32 or bfloat16"
