"""Shard rules on canonical weights: which rows or columns of a layer each tensor-parallel rank holds.

Owns what a quantization spec needs from a split (`Partition`, in parallel/partition.py, owns the
arithmetic of the split itself): the group, block, act-order, zero-point and fp8-byte rules, which
kernel a shard needs, and cutting `QuantWeight`s and dense tensors by a partition with exact zero
padding. Knows nothing about modules, checkpoints or processes: the loader's preflight plan
decides which layer is split which way, and the loader and `anyquant convert` call these rules.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from anyquant.errors import UnsupportedError
from anyquant.parallel.partition import Partition, divisors, rank_index
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight

# column: the output features (weight rows) are split; row: the input features (weight columns).
ShardStyle = Literal["column", "row"]


# -- what a spec needs from a split --------------------------------------------------------------


def column_unit(spec: QuantSpec | None) -> int:
    """Rows that must stay together when a column-parallel layer is split: FP8 block rows."""
    if spec is not None and spec.granularity == "block":
        return spec.block_shape[0]
    return 1


def row_unit(spec: QuantSpec | None) -> int:
    """Input columns that must stay together in a row-parallel split (groups, blocks, act groups).

    Act-order layers count their group size too: headers cannot tell whether `g_idx` is trivial,
    and whole groups keep the trivial case on contiguous groups after decode.
    """
    if spec is None:
        return 1
    unit = 1
    if spec.granularity == "group":
        unit = spec.group_size
    elif spec.granularity == "block":
        unit = spec.block_shape[1]
    if spec.act is not None and spec.act.granularity == "group":
        unit = math.lcm(unit, spec.act.group_size)
    return unit


def _block_map(index: Tensor, block: int) -> Tensor | None:
    """Original block of each local block of `block` entries, -1 for all-padding blocks.

    None when some local block holds real entries of two original blocks (then no per-block scale
    can describe it)."""
    n = index.numel()
    nb = -(-n // block)
    padded = torch.full((nb * block,), -1, dtype=torch.long)
    padded[:n] = index
    blocks = padded.view(nb, block)
    orig = torch.where(blocks >= 0, blocks // block, -1)
    hi = orig.amax(dim=1)
    lo = torch.where(blocks >= 0, orig, hi.unsqueeze(1)).amin(dim=1)
    return hi if bool((lo == hi).all()) else None


def _common_block(partition: Partition, block: int, multiple_of: int) -> int | None:
    """The largest divisor of `block` (a multiple of `multiple_of`) whose blocks no rank mixes.

    Splitting a scale block into finer blocks that share its scale is exact (formats.md §10.4,
    "FP8-block misalignment"); the same holds for integer groups."""
    for size in sorted(divisors(block), reverse=True):
        if size % multiple_of:
            continue
        if all(_block_map(rank_index(partition, r), size) is not None for r in range(partition.world)):
            return size
    return None


@lru_cache(maxsize=4096)
def _whole_groups(partition: Partition, group: int) -> bool:
    """Every original group of `group` entries lies wholly inside one local group of one rank."""
    for rank in range(partition.world):
        index = rank_index(partition, rank)
        bmap = _block_map(index, group)
        if bmap is None:
            return False
        n = index.numel()
        padded = torch.full((bmap.numel() * group,), -1, dtype=torch.long)
        padded[:n] = index
        real = (padded.view(-1, group) >= 0).sum(dim=1)
        full = torch.clamp(partition.size - bmap * group, max=group)
        if not bool(torch.where(bmap >= 0, real == full, True).all()):
            return False
    return True


def local_spec(
    spec: QuantSpec | None, style: ShardStyle, partition: Partition, name: str
) -> QuantSpec | None:
    """The spec each rank's shard has: the stored one, with groups or blocks refined where the split
    cuts through them. Raises UnsupportedError, naming `name`, when no exact shard exists."""
    if spec is None or partition.world == 1:
        return spec
    result = _local_spec(spec, style, partition)
    if isinstance(result, str):
        raise UnsupportedError(f"{name}: {result}")
    return result


@lru_cache(maxsize=4096)
def _local_spec(spec: QuantSpec, style: ShardStyle, partition: Partition) -> QuantSpec | str:
    """local_spec without the layer name, cached: thousands of experts share one answer."""
    if style == "column":
        if spec.granularity == "block":
            bn, bk = spec.block_shape
            rows = _common_block(partition, bn, 1)
            return (
                _cut_error("block rows", bn, partition)
                if rows is None
                else replace(spec, block_shape=(rows, bk))
            )
        return spec
    out = spec
    if spec.granularity == "group" and not spec.act_order:
        g = _common_block(partition, spec.group_size, 8)
        if g is None:
            return _cut_error("groups", spec.group_size, partition)
        out = replace(spec, group_size=g)
    elif spec.granularity == "block":
        bn, bk = spec.block_shape
        cols = _common_block(partition, bk, 1)
        if cols is None:
            return _cut_error("block columns", bk, partition)
        out = replace(spec, block_shape=(bn, cols))
    act = spec.act
    if act is not None and act.granularity == "group" and not _whole_groups(partition, act.group_size):
        # A split through activation groups (attention heads that do not fill whole groups): each
        # rank quantizes its columns in finer groups that never mix two original groups, and the
        # ranks max-reduce every original group's amax (`activation_group_map`), so the scales are
        # the unsplit layer's. Size 1 always qualifies, so this never refuses.
        fine = _common_block(partition, act.group_size, 1)
        assert fine is not None
        out = replace(out, act=replace(act, group_size=fine))
    return out


def activation_group_map(
    stored: QuantSpec | None, local: QuantSpec | None, partition: Partition, rank: int
) -> tuple[Tensor, int] | None:
    """For a row shard of a split that cuts dynamic activation groups across ranks: the original
    group of each of this rank's local groups (`local_spec` refined them so none mixes two;
    [local groups] int64, -1 for groups of padding only) and the number of original groups. The
    row-parallel layer max-reduces amaxes over the original groups through it. None when every
    original group lies whole on one rank (a rank's own group amaxes are then the global ones)."""
    if stored is None or local is None or stored.act is None or local.act is None:
        return None
    if stored.act.granularity != "group" or _whole_groups(partition, stored.act.group_size):
        return None
    fine, whole = local.act.group_size, stored.act.group_size
    index = rank_index(partition, rank)
    padded = torch.full((-(-index.numel() // fine) * fine,), -1, dtype=torch.long)
    padded[: index.numel()] = index
    # Every real entry of a local group lies in one original group (local_spec chose `fine` so).
    first = padded.view(-1, fine).amax(dim=1)
    return torch.where(first >= 0, first // whole, -1), -(-partition.size // whole)


def needs_reference_kernel(style: ShardStyle, spec: QuantSpec | None) -> bool:
    """A row shard of an act-order layer keeps, per rank, the scattered global groups its columns
    use (`_act_order_cols`); the fast kernels need whole contiguous groups, so it runs on the
    reference kernel."""
    return style == "row" and spec is not None and spec.act_order


def shard_kernel(style: ShardStyle, spec: QuantSpec | None, prefer: str | None) -> str | None:
    """The kernel to ask for a shard holding `spec`: `prefer` when the user named one, else the
    reference kernel where `needs_reference_kernel`, else None (the registry's choice)."""
    if prefer is None and needs_reference_kernel(style, spec):
        return "reference"
    return prefer


def _cut_error(what: str, size: int, partition: Partition) -> str:
    return (
        f"splitting {partition.size} features as {partition.describe()} cuts {what} of {size} so that "
        "no exact per-rank layout exists (a finer group would be smaller than 8); choose another "
        "tensor-parallel size"
    )


# -- cutting weights -----------------------------------------------------------------------------


def _pad_zero(spec: QuantSpec) -> int:
    """Zero point (and code) of a brand-new padding group: the implicit zero, so codes == zero."""
    return spec.implicit_zero


def _select(t: Tensor, dim: int, index: Tensor, fill: float | int) -> Tensor:
    """t.index_select(dim, index) with -1 entries set to `fill`."""
    out = t.index_select(dim, index.clamp(min=0))
    pad = index < 0
    if bool(pad.any()):
        view = out.view(torch.uint8) if out.dtype.is_floating_point and out.element_size() == 1 else out
        fill_value = 0 if view is not out else fill  # fp8: byte 0x00 is +0.0
        view.index_fill_(dim, torch.nonzero(pad).flatten(), fill_value)
    return out


def _refine(scale: Tensor, dim: int, old: int, new: int, entries: int) -> Tensor:
    """Scale grid of blocks `old` -> finer blocks `new` (each fine block repeats its scale)."""
    if new == old:
        return scale
    return scale.repeat_interleave(old // new, dim=dim).narrow(dim, 0, -(-entries // new))


def shard_quant(
    weight: QuantWeight, style: ShardStyle, partition: Partition, rank: int, name: str
) -> QuantWeight:
    """This rank's piece of `weight`, padded with entries that dequantize to exactly zero."""
    spec = local_spec(weight.spec, style, partition, name)
    assert spec is not None
    index = rank_index(partition, rank)
    out = _shard_rows(weight, spec, index) if style == "column" else _shard_cols(weight, spec, index)
    return out.validate(name)


def _shard_rows(w: QuantWeight, spec: QuantSpec, index: Tensor) -> QuantWeight:
    n, k = w.shape
    zero_code = _pad_zero(spec)
    data = _select(w.data, -2, index, zero_code)
    scale, zero = w.scale, w.zero
    if spec.granularity in ("channel", "group"):
        dim = -1 if spec.granularity == "channel" else -2
        scale = _select(scale, dim, index, 1.0)
        zero = None if zero is None else _select(zero, dim, index, zero_code)
    elif spec.granularity == "block":
        (bn, _), (new, _) = w.spec.block_shape, spec.block_shape
        bmap = _block_map(index, new)
        assert bmap is not None
        scale = _select(_refine(scale, -2, bn, new, n), -2, bmap, 1.0)
    # Padded rows: code 0 times scale 1.0 plus offset 0.0 is exactly zero.
    offset = None if w.offset is None else _select(w.offset, -2, index, 0.0)
    return QuantWeight(
        spec, (index.numel(), k), data, scale, zero, w.group_index, w.input_scale, w.input_zero, offset
    )


def _shard_cols(w: QuantWeight, spec: QuantSpec, index: Tensor) -> QuantWeight:
    n, k = w.shape
    real = index >= 0
    data = w.data.index_select(-1, index.clamp(min=0))
    scale, zero, group_index, offset = w.scale, w.zero, w.group_index, w.offset
    # Per local column, the zero point its padding code must equal so that it dequantizes to 0.
    col_zero: Tensor | int = _pad_zero(spec)
    if spec.granularity == "channel" and zero is not None:
        col_zero = zero.unsqueeze(-1).expand(*zero.shape, index.numel())
    elif spec.granularity == "group" and not spec.act_order:
        bmap = _block_map(index, spec.group_size)
        assert bmap is not None
        scale = _select(_refine(scale, -1, w.spec.group_size, spec.group_size, k), -1, bmap, 1.0)
        if zero is not None:
            zero = _select(
                _refine(zero, -1, w.spec.group_size, spec.group_size, k), -1, bmap, _pad_zero(spec)
            )
            col_zero = zero.repeat_interleave(spec.group_size, dim=-1)[..., : index.numel()]
        if offset is not None:
            # Padding groups get offset 0 (code 0 * scale 1 + 0 = 0); a padding column inside a
            # real group would add that group's offset, so such a split is refused, never inexact.
            offset = _select(_refine(offset, -1, w.spec.group_size, spec.group_size, k), -1, bmap, 0.0)
            col_offset = offset.repeat_interleave(spec.group_size, dim=-1)[..., : index.numel()]
            if bool((col_offset[..., ~real] != 0).any()):
                raise UnsupportedError(
                    f"a row-parallel split would put padding inputs inside a group with a float offset "
                    f"(group {spec.group_size}); choose a tensor-parallel size that splits whole groups"
                )
    elif spec.granularity == "group":
        scale, zero, group_index = _act_order_cols(w, index)
        if zero is not None:
            col_zero = torch.gather(zero, -1, group_index.long().unsqueeze(-2).expand(*zero.shape[:-1], -1))
    elif spec.granularity == "block":
        (_, bk), (_, new) = w.spec.block_shape, spec.block_shape
        bmap = _block_map(index, new)
        assert bmap is not None
        scale = _select(_refine(scale, -1, bk, new, k), -1, bmap, 1.0)
    if not bool(real.all()):
        if spec.is_float:
            data.view(torch.uint8)[..., ~real] = 0
        elif isinstance(col_zero, Tensor):
            data[..., ~real] = col_zero[..., ~real].to(data.dtype)
        else:
            data[..., ~real] = col_zero
    return QuantWeight(
        spec, (n, index.numel()), data, scale, zero, group_index, w.input_scale, w.input_zero, offset
    )


def _act_order_cols(w: QuantWeight, index: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Act-order row shard: keep the global groups this rank's columns use, renumbered densely.

    Columns map to groups through `g_idx`, so any split is exact; the scales of the groups the
    rank touches are copied (formats.md §10.2, "keep the global group ids"). Padding columns use
    local group 0 with code = its zero point.
    """
    assert w.group_index is not None
    real = index >= 0
    gi = w.group_index.long().index_select(-1, index.clamp(min=0))
    used = torch.unique(gi[..., real]) if bool(real.any()) else torch.zeros(1, dtype=torch.long)
    lookup = torch.full((int(w.scale.shape[-1]),), -1, dtype=torch.long)
    lookup[used] = torch.arange(used.numel())
    local = torch.where(real, lookup[gi], 0)
    scale = w.scale.index_select(-1, used)
    zero = None if w.zero is None else w.zero.index_select(-1, used)
    return scale, zero, local.to(w.group_index.dtype)


def shard_dense(tensor: Tensor, style: ShardStyle, partition: Partition, rank: int) -> Tensor:
    """Rows (column style) or columns (row style) of a dense [N, K] weight, zero-padded."""
    return _select(tensor, 0 if style == "column" else 1, rank_index(partition, rank), 0)


def shard_vector(vector: Tensor, partition: Partition, rank: int) -> Tensor:
    """A column-parallel bias (or any per-output vector), zero-padded."""
    return _select(vector, 0, rank_index(partition, rank), 0)
