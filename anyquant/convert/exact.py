"""Exact translation of one canonical weight into another spec, or the reason it cannot be exact.

Owns the format-independent question "can the numbers of this `QuantWeight` be written with that
`QuantSpec` without changing a single dequantized value?". A weight's value is level * scale per
element (level = code - zero for integers, the fp8 value for fp8). A target spec can hold it
exactly when, over every target scale entry (tensor, row, group or block):

- the source scales are all equal (and survive the cast to the dtype the target stores them in),
- every level fits the target's code type (an integer range given a zero point that may be chosen
  per entry, or an fp8 value), and the activation quantization is the same.

Nothing here knows a file format: the converter asks the target writer for its spec and hands
the result to the writer's `encode`. Stats are gathered a block of rows at a time so the
temporaries stay a small fraction of one layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from anyquant.quant.reference import dequantize, expand_to_columns
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, code_dtype

# Elements per block of rows for the temporaries (float32 / int32 copies of the block).
_BLOCK_ELEMENTS = 1 << 21


def minimal(weight: QuantWeight) -> QuantWeight:
    """The same numbers with the simplest spec: stored zero points that all equal the implicit
    zero are dropped (a symmetric weight written with explicit zeros, as AWQ always does)."""
    spec = weight.spec
    zero = weight.zero
    stored = spec.has_zero and spec.is_uint and zero is not None and zero.numel() > 0
    if stored and zero is not None and bool((zero == spec.implicit_zero).all()):
        return replace(weight, spec=replace(spec, has_zero=False), zero=None)
    return weight


def trivial_group_index(weight: QuantWeight) -> bool:
    """An act-order index that is just column // group_size (groups in column order)."""
    gi = weight.group_index
    if gi is None:
        return True
    want = torch.arange(weight.shape[1], dtype=torch.int64) // weight.spec.group_size
    return bool((gi.to(torch.int64) == want).all())


def drop_trivial_act_order(weight: QuantWeight) -> QuantWeight:
    if weight.spec.act_order and trivial_group_index(weight):
        return replace(weight, spec=replace(weight.spec, act_order=False), group_index=None)
    return weight


# -- entry maps: which target scale entry each element belongs to ------------------------------


def _row_entries(spec: QuantSpec, start: int, stop: int) -> Tensor:
    """Global scale-grid row of each weight row in [start, stop)."""
    rows = torch.arange(start, stop, dtype=torch.int64)
    if spec.granularity == "tensor":
        return torch.zeros_like(rows)
    if spec.granularity == "block":
        return rows // spec.block_shape[0]
    return rows


def _col_entries(spec: QuantSpec, k: int, group_index: Tensor | None) -> Tensor:
    cols = torch.arange(k, dtype=torch.int64)
    if spec.granularity in ("tensor", "channel"):
        return torch.zeros_like(cols)
    if spec.granularity == "block":
        return cols // spec.block_shape[1]
    if group_index is not None:
        return group_index.to(torch.int64).reshape(-1, k)[0] if group_index.dim() > 1 else group_index.long()
    return cols // spec.group_size


def _grid_shape(spec: QuantSpec, shape: tuple[int, int], group_index: Tensor | None) -> tuple[int, int]:
    n, k = shape
    if spec.granularity == "tensor":
        return 1, 1
    if spec.granularity == "channel":
        return n, 1
    if spec.granularity == "block":
        bn, bk = spec.block_shape
        return -(-n // bn), -(-k // bk)
    ng = -(-k // spec.group_size)
    if group_index is not None and group_index.numel():
        ng = max(ng, int(group_index.max()) + 1)
    return n, ng


def _to_canonical_scale(grid: Tensor, spec: QuantSpec) -> Tensor:
    """[E?, rows, cols] grid -> the canonical scale shape of `spec`."""
    if spec.granularity == "tensor":
        return grid[..., 0, 0]
    if spec.granularity == "channel":
        return grid[..., 0]
    return grid


def _row_blocks(weight: QuantWeight, step_multiple: int) -> Iterator[tuple[int, int]]:
    n, k = weight.shape
    rows = max(step_multiple, _BLOCK_ELEMENTS // max(k, 1) // step_multiple * step_multiple)
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _scale_step(*specs: QuantSpec) -> int:
    step = 1
    for spec in specs:
        if spec.granularity == "block":
            step = math.lcm(step, spec.block_shape[0])
    return step


def row_slice(weight: QuantWeight, start: int, stop: int) -> QuantWeight:
    """Rows [start, stop) of a weight (`start` a multiple of the block height for block scales)."""
    spec = weight.spec
    scale, zero = weight.scale, weight.zero
    if spec.granularity == "block":
        bn = spec.block_shape[0]
        scale = scale[..., start // bn : -(-stop // bn), :]
    elif spec.granularity == "channel":
        scale = scale[..., start:stop]
        zero = None if zero is None else zero[..., start:stop]
    elif spec.granularity == "group":
        scale = scale[..., start:stop, :]
        zero = None if zero is None else zero[..., start:stop, :]
    data = weight.data[..., start:stop, :]
    return replace(weight, shape=(stop - start, weight.shape[1]), data=data, scale=scale, zero=zero)


def _levels(block: QuantWeight) -> Tensor:
    """level per element: code - zero (int32) for integer weights, the fp8 value (float32) for fp8."""
    spec = block.spec
    if spec.is_float:
        return block.data.float()
    codes = block.data.to(torch.int32)
    if block.zero is not None:
        return codes - _per_element(block.zero, block)
    return codes - spec.implicit_zero


def _per_element(values: Tensor, block: QuantWeight) -> Tensor:
    """Scale-shaped values of `block` expanded to its [E?, R, K] elements."""
    spec, (r, k) = block.spec, block.shape
    if spec.granularity == "tensor":
        return values.reshape(*values.shape, 1, 1).expand(*block.data.shape)
    if spec.granularity == "channel":
        return values.unsqueeze(-1).expand(*block.data.shape)
    if spec.granularity == "group":
        return expand_to_columns(values, spec, k, block.group_index)
    bn, bk = spec.block_shape
    return values.repeat_interleave(bn, dim=-2)[..., :r, :].repeat_interleave(bk, dim=-1)[..., :k]


class _Grid:
    """Per-target-entry reductions (min / max) accumulated over blocks of rows."""

    def __init__(self, lead: tuple[int, ...], rows: int, cols: int, dtype: torch.dtype, fill: float) -> None:
        self.rows, self.cols = rows, cols
        self.values = torch.full((*lead, rows * cols), fill, dtype=dtype)

    def reduce(self, x: Tensor, row_map: Tensor, col_map: Tensor, how: str) -> None:
        flat = (row_map.unsqueeze(-1) * self.cols + col_map.unsqueeze(0)).reshape(-1)
        src = x.reshape(*x.shape[:-2], -1).to(self.values.dtype)
        index = flat.expand(*src.shape)
        self.values = self.values.scatter_reduce(-1, index, src, reduce=how, include_self=True)

    def grid(self) -> Tensor:
        return self.values.reshape(*self.values.shape[:-1], self.rows, self.cols)


def _describe_entry(spec: QuantSpec) -> str:
    if spec.granularity == "group":
        return f"group of {spec.group_size} inputs"
    if spec.granularity == "block":
        return f"{spec.block_shape[0]}x{spec.block_shape[1]} block"
    return "row" if spec.granularity == "channel" else "tensor"


def fit_exact(weight: QuantWeight, target: QuantSpec, scale_dtype: torch.dtype) -> QuantWeight | str:
    """`weight` rewritten with spec `target` and scales stored in `scale_dtype`, every dequantized
    value unchanged; or the reason that is impossible (for the layer's refusal message)."""
    source = weight.spec
    if source.act != target.act:
        src_act = source.act.describe() if source.act else "none (weight-only)"
        tgt_act = target.act.describe() if target.act else "none (weight-only)"
        return f"activation quantization differs: the source layer uses {src_act}, the target {tgt_act}"
    if source.has_offset and not target.has_offset and not _offsets_zero(weight):
        return (
            "it has a float offset per group (value = code * scale + offset, GGUF's k-quant and "
            f"Q4_1 / Q5_1 minimums); {target.weight} codes have only integer zero points"
        )
    if source.act_order and not target.act_order and not trivial_group_index(weight):
        return "non-trivial act-order g_idx (input columns reach their groups out of order)"
    if target.act_order and source.act_order and source.group_size != target.group_size:
        return f"act-order groups of {source.group_size}, the target uses {target.group_size}"
    if target.is_uint and target.granularity not in ("channel", "group"):
        return f"{target.weight} needs channel or group scales"
    gidx = weight.group_index if (source.act_order and target.act_order) else None
    if target.act_order and gidx is None:
        gidx = (torch.arange(weight.shape[1]) // target.group_size).to(torch.int32)
    lead = weight.lead
    k = weight.shape[1]
    rows, cols = _grid_shape(target, weight.shape, gidx)
    col_map = _col_entries(target, k, gidx)
    step = _scale_step(source, target)
    is_int_target = not target.is_float

    # Pass 1: per target entry, min / max of the scales and of the levels.
    s_lo = _Grid(lead, rows, cols, torch.float32, float("inf"))
    s_hi = _Grid(lead, rows, cols, torch.float32, float("-inf"))
    q_lo = _Grid(lead, rows, cols, torch.int32, 1 << 30)
    q_hi = _Grid(lead, rows, cols, torch.int32, -(1 << 30))
    z_pref = _Grid(lead, rows, cols, torch.int32, 1 << 30)
    for start, stop in _row_blocks(weight, step):
        block = row_slice(weight, start, stop)
        row_map = _row_entries(target, start, stop)
        scale = _per_element(block.scale, block)
        s_lo.reduce(scale, row_map, col_map, "amin")
        s_hi.reduce(scale, row_map, col_map, "amax")
        if is_int_target:
            levels = _levels(block)
            if levels.dtype.is_floating_point:
                if not bool((levels == levels.round()).all()):
                    return f"{source.weight} values are not integers, so no {target.weight} code holds them"
                if levels.numel() and float(levels.abs().max()) > 1 << 16:
                    return f"{source.weight} values exceed the {target.weight} range"
                levels = levels.to(torch.int32)
            q_lo.reduce(levels, row_map, col_map, "amin")
            q_hi.reduce(levels, row_map, col_map, "amax")
            if target.has_zero:
                z_pref.reduce(_preferred_zero(block, target), row_map, col_map, "amin")
    lo, hi = s_lo.grid(), s_hi.grid()
    if not bool((lo == hi).all()):
        return (
            f"scales differ within one {_describe_entry(target)} of the target "
            f"(source: {source.describe()}, target: {target.describe()})"
        )
    stored = lo.to(scale_dtype).float()
    if not bool((stored == lo).all()):
        return f"scales are not exactly representable in {str(scale_dtype).removeprefix('torch.')}, as the target stores them"
    zero_grid: Tensor | None = None
    if is_int_target:
        lo_code, hi_code = (0, (1 << target.bits) - 1) if target.is_uint else (-128, 127)
        qmin, qmax = q_lo.grid(), q_hi.grid()
        if target.has_zero:
            # code = level + zero must be a code, and so must the zero point itself.
            zmin = torch.clamp(lo_code - qmin, min=lo_code)
            zmax = torch.clamp(hi_code - qmax, max=hi_code)
            if not bool((zmin <= zmax).all()):
                return (
                    f"levels (code - zero) within one {_describe_entry(target)} need more than the "
                    f"{target.bits}-bit codes around a zero point that is itself a code"
                )
            zero_grid = torch.minimum(torch.maximum(z_pref.grid(), zmin), zmax).to(torch.int32)
        else:
            z = target.implicit_zero
            if not bool(((qmin + z >= lo_code) & (qmax + z <= hi_code)).all()):
                return (
                    f"levels (code - zero) reach [{int(qmin.min())}, {int(qmax.max())}], outside what "
                    f"{target.weight} codes hold around the implicit zero {z}"
                )

    # Pass 2: the codes.
    scale = _to_canonical_scale(stored, target)
    zero = None if zero_grid is None else _to_canonical_scale(zero_grid, target)
    out = QuantWeight(target, weight.shape, torch.empty(weight.data.shape, dtype=code_dtype(target)),
                      scale, zero, gidx, weight.input_scale, weight.input_zero)  # fmt: skip
    for start, stop in _row_blocks(weight, step):
        block = row_slice(weight, start, stop)
        levels = _levels(block)
        target_block = row_slice(out, start, stop)
        if target.is_float:
            codes = levels.float().to(target.traits.code_dtype)
            if not bool((codes.float() == levels.float()).all()):
                return f"values are not exactly representable as {target.weight}"
            out.data[..., start:stop, :] = codes
        else:
            zeros: Tensor | int = (
                _per_element(target_block.zero, target_block)
                if target_block.zero is not None
                else target.implicit_zero
            )
            out.data[..., start:stop, :] = (levels.to(torch.int32) + zeros).to(out.data.dtype)
    return out.validate("converted weight")


def _offsets_zero(weight: QuantWeight) -> bool:
    return weight.offset is None or not bool((weight.offset != 0).any())


def _preferred_zero(block: QuantWeight, target: QuantSpec) -> Tensor:
    """The zero point a target entry should get when any in a range would do: the source's own
    (shifted by the difference of the implicit zeros when the widths differ), so a round trip
    through a symmetric format restores the same zero points."""
    source = block.spec
    shift = target.implicit_zero - source.implicit_zero if source.is_uint or target.is_uint else 0
    if block.zero is not None:
        return _per_element(block.zero, block) + shift
    return torch.full(block.data.shape, target.implicit_zero, dtype=torch.int32)


def dequantized_equal(a: QuantWeight, b: QuantWeight) -> bool:
    """Both weights dequantize to the same float64 values (checked a block of rows at a time)."""
    if a.shape != b.shape or a.lead != b.lead:
        return False
    step = _scale_step(a.spec, b.spec)
    for start, stop in _row_blocks(a, step):
        if not torch.equal(
            dequantize(row_slice(a, start, stop), torch.float64),
            dequantize(row_slice(b, start, stop), torch.float64),
        ):
            return False
    return True
