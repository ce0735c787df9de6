"""Canonical weights -> GGML blocks for `--format gguf`: which 32-element type holds a layer exactly.

Owns fitting a decoded layer to Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 (the smallest that holds every
value exactly, in that order of bits per weight) and packing the fitted weight into GGML's block
bytes, the inverse of quant/formats/gguf_blocks.py's decoding. Q4_0 / Q5_0 / Q8_0 are symmetric
(value = level * d) and go through the shared exact fitting (exact.py), with a range check for
Q5_0's 5-bit levels. Q4_1 / Q5_1 store value = q * d + m with an fp16 minimum m per block: a block
of integer levels L (code - zero point) with one scale s and offset o takes q = L - t and
m = o + t * s for a shift t that keeps q within the codes and makes m an fp16 value (t = 0 first,
so a Q4_1 / Q5_1 source keeps its own blocks); an asymmetric int4 / int5 layer (GPTQ, AWQ with zero
points) fits where some such minimum is an fp16 value. Every fit is checked by dequantizing both
sides as GGML does (float32 product, then sum).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.convert.exact import _levels, _per_element, dequantized_equal, fit_exact, trivial_group_index
from anyquant.errors import AnyquantError
from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES
from anyquant.quant.reference import dequantize
from anyquant.quant.weight import QuantWeight

# Smallest first (bits per weight: 4.5, 5, 5.5, 6, 8.5).
KINDS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_CODE_BITS = {"Q4_1": 4, "Q5_1": 5}
_BLOCK = 32


def fit_ggml(prefix: str, weight: QuantWeight) -> tuple[str, QuantWeight] | str:
    """(type, the weight in that type's canonical form) for the first type of KINDS that holds
    `weight` exactly, or every type's reason for the layer's refusal."""
    reasons = []
    for kind in KINDS:
        fitted = _fit_offset(weight, kind) if kind in _CODE_BITS else _fit_symmetric(weight, kind)
        if isinstance(fitted, str):
            reasons.append(f"{kind}: {fitted}")
            continue
        if not (dequantized_equal(weight, fitted) and _float32_equal(weight, fitted)):
            raise AnyquantError(
                f"{prefix}: the exact translation to {kind} changed dequantized values (a bug)"
            )
        return kind, fitted
    return "; ".join(reasons)


def _fit_symmetric(weight: QuantWeight, kind: str) -> QuantWeight | str:
    fitted = fit_exact(weight, BLOCK_TYPES[kind].spec, torch.float16)
    if isinstance(fitted, str) or kind != "Q5_0":
        return fitted
    codes = fitted.data
    if bool(((codes < -16) | (codes > 15)).any()):  # held as int8, GGML stores 5 bits
        return f"levels reach [{int(codes.min())}, {int(codes.max())}], beyond Q5_0's [-16, 15]"
    return fitted


def _fit_offset(weight: QuantWeight, kind: str) -> QuantWeight | str:
    spec = weight.spec
    top = (1 << _CODE_BITS[kind]) - 1
    n, k = weight.shape
    if spec.is_float:
        return f"{spec.weight} values are not integer codes"
    if weight.lead or k % _BLOCK:
        return f"shape {list(weight.data.shape)} is not [out, in] with in a multiple of {_BLOCK}"
    if spec.act_order and not trivial_group_index(weight):
        return "non-trivial act-order g_idx (input columns reach their groups out of order)"
    if spec.granularity not in ("channel", "group", "tensor"):
        return f"{spec.granularity} scales"
    blocks = (n, k // _BLOCK, _BLOCK)
    levels = _levels(weight).reshape(blocks)
    scale = _per_element(weight.scale, weight).float().reshape(blocks)
    offset = (
        torch.zeros(blocks)
        if weight.offset is None
        else _per_element(weight.offset, weight).float().reshape(blocks)
    )
    d, o = scale[..., 0], offset[..., 0]
    if not bool((scale == d[..., None]).all() & (offset == o[..., None]).all()):
        return "scales or offsets differ within a block of 32"
    if not bool((d.half().float() == d).all()):
        return "scales are not exactly representable in float16, as GGML stores them"
    lo, hi = levels.amin(-1), levels.amax(-1)
    if int((hi - lo).max()) > top:
        return (
            f"levels within a block of 32 span {int((hi - lo).max()) + 1} values, {kind} codes hold {top + 1}"
        )
    shift = torch.zeros(lo.shape, dtype=torch.int32)
    minimum = torch.full(lo.shape, float("nan"), dtype=torch.float64)
    # Shift 0 first (the source's own minimum), then each shift that keeps the codes in range.
    for t in [torch.zeros_like(lo), *(lo - delta for delta in range(top + 1))]:
        m = o.double() + t * d.double()
        ok = minimum.isnan() & (lo >= t) & (hi - t <= top) & (m.half().double() == m)
        shift[ok], minimum[ok] = t[ok], m[ok]
    if bool(minimum.isnan().any()):
        return f"no block minimum offset + shift * scale is a float16 value, as {kind} stores it"
    codes = (levels - shift[..., None]).to(torch.uint8).reshape(n, k)
    fitted = QuantWeight(
        BLOCK_TYPES[kind].spec, (n, k), codes, d.reshape(n, -1), offset=minimum.float().reshape(n, -1)
    )
    return fitted.validate("converted weight")


def _float32_equal(a: QuantWeight, b: QuantWeight) -> bool:
    """Bit-identical float32 values: GGML rounds q * d and then + m in float32."""
    return torch.equal(dequantize(a, torch.float32), dequantize(b, torch.float32))


def block_bytes(kind: str, weight: QuantWeight) -> Tensor:
    """A fitted weight [N, K] -> GGML blocks [N, K / 32 * bytes per block] (uint8)."""
    n, k = weight.shape
    nb = k // _BLOCK

    def half(values: Tensor) -> Tensor:  # little-endian fp16 bytes per block
        return values.to(torch.float16).reshape(n, nb, 1).view(torch.uint8)

    codes = weight.data.reshape(n, nb, _BLOCK)
    if kind == "Q8_0":
        return torch.cat((half(weight.scale), codes.view(torch.uint8)), dim=-1).reshape(n, -1)
    unsigned = codes.to(torch.int16) + 16 if kind == "Q5_0" else codes.to(torch.int16)
    unsigned = unsigned.to(torch.uint8)
    low = unsigned & 0x0F
    qs = low[..., :16] | (low[..., 16:] << 4)  # elements 0..15 low nibbles, 16..31 high
    parts = [half(weight.scale)]
    if kind in ("Q4_1", "Q5_1"):
        assert weight.offset is not None
        parts.append(half(weight.offset))
    if kind in ("Q5_0", "Q5_1"):
        # The 5th bits as a little-endian 32-bit mask: bit j of byte b is element 8 b + j.
        high = ((unsigned >> 4) & 1).reshape(n, nb, 4, 8)
        weights = (1 << torch.arange(8, dtype=torch.int32)).reshape(1, 1, 1, 8)
        parts.append((high.to(torch.int32) * weights).sum(-1).to(torch.uint8))
    parts.append(qs)
    return torch.cat(parts, dim=-1).reshape(n, -1)
