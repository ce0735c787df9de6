"""The definition of correct: dequantize a canonical weight, quantize-dequantize activations.

Owns the formulas of formats.md in plain PyTorch for every spec on every device. Kernels are
held against these functions; formats never call them (they only translate layouts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from anyquant.quant.weight_types import weight_traits


def expand_to_columns(
    per_group: Tensor, spec: QuantSpec, in_features: int, group_index: Tensor | None
) -> Tensor:
    """[..., N, ng] per-group values -> [..., N, K] per-column values."""
    if group_index is not None:
        if group_index.dim() == 1:
            return per_group[..., group_index.long()]
        return torch.gather(per_group, -1, group_index.long().unsqueeze(-2).expand(*per_group.shape[:-1], -1))
    idx = torch.arange(in_features, device=per_group.device) // spec.group_size
    return per_group[..., idx]


def _broadcast(values: Tensor, weight: QuantWeight) -> Tensor:
    """Expand scale-shaped `values` to the [..., N, K] shape of the codes."""
    spec, (n, k) = weight.spec, weight.shape
    if spec.granularity == "tensor":
        return values.reshape(*values.shape, 1, 1)
    if spec.granularity == "channel":
        return values.unsqueeze(-1)
    if spec.granularity == "group":
        return expand_to_columns(values, spec, k, weight.group_index)
    bn, bk = spec.block_shape
    return values.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def dequantize(weight: QuantWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense [E?, N, K] weight: (code - zero) * scale [+ offset], the subtraction exact, one
    rounding to `dtype` (two in fp32 with an offset: product, then sum, exactly as GGUF defines it)."""
    spec = weight.spec
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if spec.is_float:
        values = weight.data.to(work)
    else:
        codes = weight.data.to(torch.int32)
        if weight.zero is not None:
            codes = codes - _broadcast(weight.zero, weight)
        elif spec.implicit_zero:
            codes = codes - spec.implicit_zero
        values = codes.to(work)
    scaled = values * _broadcast(weight.scale.to(work), weight)
    if weight.offset is not None:  # after the product, as the formats with a float minimum define it
        scaled = scaled + _broadcast(weight.offset.to(work), weight)
    return scaled.to(dtype)


def _act_qrange(act: ActQuant) -> tuple[float, float]:
    traits = weight_traits(act.type)
    return float(traits.code_min), float(traits.code_max)


def activation_amax(x: Tensor, act: ActQuant) -> Tensor:
    """The fp32 amax that dynamic activation scales of `x` [T, K] come from: [T, 1] per token,
    [1, 1] per tensor, [T, ceil(K / group_size)] per group (a last partial group zero-padded).

    Separate from the quantization so that a caller holding only a slice of the input features
    (a row-parallel rank) can combine the slices' amaxes (their max) before quantizing."""
    ax = x.float().abs()
    if act.granularity == "token":
        return ax.amax(dim=-1, keepdim=True)
    if act.granularity == "group":
        t, k = ax.shape
        pad = (-k) % act.group_size
        groups = (k + pad) // act.group_size
        return torch.nn.functional.pad(ax, (0, pad)).reshape(t, groups, act.group_size).amax(dim=-1)
    # No tokens: no amax to take (a rank still joins the collective with a neutral 0).
    return ax.amax().reshape(1, 1) if ax.numel() else ax.new_zeros(1, 1)


def fake_quantize_activations(
    x: Tensor,
    act: ActQuant,
    input_scale: Tensor | None = None,
    input_zero: Tensor | None = None,
    amax: Tensor | None = None,
) -> Tensor:
    """Quantize then dequantize activations `x` [T, K] exactly as a W8A8 kernel sees them (fp32).

    amax: dynamic schemes only, an `activation_amax`-shaped amax to use instead of x's own (under
    tensor parallelism, the max over every rank's slice of the input features)."""
    x = x.float()
    lo, hi = _act_qrange(act)
    qmax = act.scale_divisor or hi
    if act.dynamic:
        if amax is None:
            amax = activation_amax(x, act)
        if act.granularity == "group":
            amax = amax.repeat_interleave(act.group_size, dim=-1)[:, : x.shape[1]]
        # An all-zero row or group (padding) has amax 0; clamp so 0/0 never makes NaN.
        scale = amax.clamp(min=1e-10) / qmax
        zero = None
    else:
        if input_scale is None:
            raise ValueError("static activation quantization needs input_scale")
        scale = input_scale.float()
        zero = input_zero.float() if input_zero is not None else None
    if act.type == "int8":
        q = torch.round(x / scale)
        if zero is not None:
            q = q + zero
        q = q.clamp(lo, hi)
        if zero is not None:
            q = q - zero
        return q * scale
    # fp8: clamp before the cast, out-of-range casts do not saturate reliably.
    q = (x / scale).clamp(lo, hi).to(weight_traits(act.type).code_dtype).float()
    return q * scale


def reference_linear(
    x: Tensor, weight: QuantWeight, bias: Tensor | None = None, out_dtype: torch.dtype | None = None
) -> Tensor:
    """y = act_q(x) @ dequantize(W).T + bias, in fp32, for one (non-expert) layer."""
    out_dtype = out_dtype or x.dtype
    xf = x.float()
    if weight.spec.act is not None:
        xf = fake_quantize_activations(xf, weight.spec.act, weight.input_scale, weight.input_zero)
    y = xf @ dequantize(weight, torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
