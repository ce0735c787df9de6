"""compressed-tensors stored tensors -> canonical pieces: unpacking codes, scale and zero-point
layouts, group indices and input scalars, each checked against the layer's spec and shape.
Used by the reader (reader.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from anyquant.errors import TensorError
from anyquant.quant.formats.base import require_dtype
from anyquant.quant.formats.compressed_tensors.config import _FLOAT_DTYPES
from anyquant.quant.packing import unpack_bits
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import expected_scale_shape, num_groups, require_finite

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _get(stored: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in stored:
        raise TensorError(name, "missing from the layer's stored tensors")
    return stored[name]


def _logical_shape(stored: dict[str, Tensor], name: str, lead: tuple[int, ...]) -> tuple[int, int]:
    t = _get(stored, name)
    require_dtype(name, t, *_INT_DTYPES)
    values = [int(v) for v in t.reshape(-1).tolist()]
    if len(values) != len(lead) + 2 or tuple(values[:-2]) != lead:
        raise TensorError(name, f"holds {values}, expected the original shape {[*lead, 'N', 'K']}")
    n, k = values[-2:]
    if n <= 0 or k <= 0:
        raise TensorError(name, f"holds {values}: a zero-size or negative dimension")
    return n, k


def _unpack(words: Tensor, bits: int, count: int, layout: str) -> Tensor:
    """`count` unsigned codes along the last dim of int32 `words` -> uint8."""
    if layout == "dense":
        return unpack_bits(words, bits, count)
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF  # logical shifts on the int32 bit patterns
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*w.shape[:-1], -1)
    return codes[..., :count].to(torch.uint8)


def _scale_shapes(spec: QuantSpec, shape: tuple[int, int]) -> list[tuple[int, ...]]:
    """Stored shapes accepted for a canonical scale (without the expert dim)."""
    n, _ = shape
    want = expected_scale_shape(spec, shape)
    if spec.granularity == "tensor":
        return [(1,), ()]
    if spec.granularity == "channel":
        shapes: list[tuple[int, ...]] = [(n, 1), (n,)]
        return shapes + ([(1,), ()] if spec.is_uint else [])  # uintN: tensor strategy repeated per row
    return [want]


def _match_scale_layout(
    name: str, values: Tensor, spec: QuantSpec, shape: tuple[int, int], lead: tuple[int, ...]
) -> Tensor:
    """Reshape a stored scale-shaped tensor to the canonical scale shape (checking it)."""
    want = (*lead, *expected_scale_shape(spec, shape))
    accepted = [(*lead, *s) for s in _scale_shapes(spec, shape)]
    if tuple(values.shape) not in accepted:
        raise TensorError(
            name, f"shape {list(values.shape)}, expected {list(accepted[0])} for {spec.describe()}"
        )
    if values.numel() == _prod(want):
        return values.reshape(want)
    # One value per tensor stored for a per-channel canonical scale: repeat it per row.
    return values.reshape(*lead, 1).expand(want).clone()


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _canonical_scale(
    name: str, scale: Tensor, spec: QuantSpec, shape: tuple[int, int], lead: tuple[int, ...]
) -> Tensor:
    require_dtype(name, scale, *_FLOAT_DTYPES)
    require_finite(name, scale)
    return _match_scale_layout(name, scale.to(torch.float32), spec, shape, lead)


def _group_index(
    prefix: str, spec: QuantSpec, stored: dict[str, Tensor], lead: tuple[int, ...], k: int
) -> Tensor | None:
    if not spec.act_order:
        return None
    name = f"{prefix}.weight_g_idx"
    gidx = _group_index_layout(name, stored, lead, k)
    ng = num_groups(k, spec.group_size)
    if gidx.numel() and (int(gidx.min()) < 0 or int(gidx.max()) >= ng):
        raise TensorError(name, f"group indices outside [0, {ng})")
    return gidx.to(torch.int32)


def _group_index_layout(name: str, stored: Mapping[str, Tensor], lead: tuple[int, ...], k: int) -> Tensor:
    gidx = _get(stored, name)
    require_dtype(name, gidx, *_INT_DTYPES)
    if tuple(gidx.shape) != (*lead, k):
        raise TensorError(name, f"shape {list(gidx.shape)}, expected {[*lead, k]}")
    return gidx


def _input_scalar_layout(
    name: str, stored: Mapping[str, Tensor], lead: tuple[int, ...], float_value: bool
) -> Tensor:
    t = _get(stored, name)
    require_dtype(name, t, *(_FLOAT_DTYPES if float_value else _INT_DTYPES))
    if t.numel() != _prod(lead) or tuple(t.shape) not in ((*lead, 1), lead):
        raise TensorError(name, f"shape {list(t.shape)}, expected {[*lead, 1]} (one value per tensor)")
    return t


def _input_scalar(name: str, stored: dict[str, Tensor], lead: tuple[int, ...], float_value: bool) -> Tensor:
    t = _input_scalar_layout(name, stored, lead, float_value)
    if float_value:
        require_finite(name, t, "values")
        return t.to(torch.float32).reshape(lead)
    if t.numel() and (int(t.min()) < -128 or int(t.max()) > 127):
        raise TensorError(name, "input zero point outside the int8 range")
    return t.to(torch.int32).reshape(lead)
