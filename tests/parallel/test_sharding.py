"""Shard rules on canonical weights: every rank's piece, put back together, is the whole weight, and
padding dequantizes to exact zeros (formats.md §10). The oracle is a float64 dequantizer written
here from the formula value = (code - zero) * scale, independent of anyquant.quant.reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from anyquant.errors import UnsupportedError
from anyquant.loading.loader import gather_segments
from anyquant.parallel.partition import (
    Partition,
    Segment,
    split_heads,
    split_kv_heads,
    split_regrouped,
    split_units,
)
from anyquant.quant.shard_rules import (
    local_spec,
    needs_reference_kernel,
    shard_dense,
    shard_kernel,
    shard_quant,
    shard_vector,
)
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from tests.helpers.quant_weights import random_weight


def oracle(w: QuantWeight) -> Tensor:
    """float64 [N, K]: (code - zero) * scale, every scale layout expanded by hand."""
    spec, (n, k) = w.spec, w.shape
    codes = w.data.to(torch.float64)
    if spec.granularity == "tensor":
        scale, zero = w.scale.double().expand(n, k), torch.zeros(n, k, dtype=torch.float64)
    elif spec.granularity == "channel":
        scale = w.scale.double()[:, None].expand(n, k)
        zero = w.zero.double()[:, None].expand(n, k) if w.zero is not None else None
    elif spec.granularity == "group":
        cols = w.group_index.long() if spec.act_order else torch.arange(k) // spec.group_size
        scale = w.scale.double()[:, cols]
        zero = w.zero.double()[:, cols] if w.zero is not None else None
    else:
        bn, bk = spec.block_shape
        rows, cols = torch.arange(n) // bn, torch.arange(k) // bk
        scale = w.scale.double()[rows][:, cols]
        zero = None
    if zero is None:
        zero = torch.full((n, k), float(spec.implicit_zero), dtype=torch.float64)
    return (codes - zero) * scale


SPECS = {
    "uint4-g16-asym": QuantSpec("uint4", "group", group_size=16, has_zero=True),
    "uint4-g16-sym": QuantSpec("uint4", "group", group_size=16),
    "uint3-g32-asym": QuantSpec("uint3", "group", group_size=32, has_zero=True),
    "uint4-g16-act-order": QuantSpec("uint4", "group", group_size=16, has_zero=True, act_order=True),
    "uint8-channel-asym": QuantSpec("uint8", "channel", has_zero=True),
    "int8-channel-static": QuantSpec(
        "int8", "channel", act=ActQuant("int8", dynamic=False, granularity="tensor")
    ),
    "fp8-block16": QuantSpec(
        "fp8_e4m3", "block", block_shape=(16, 16), act=ActQuant("fp8_e4m3", True, "group", group_size=16)
    ),
    "fp8-tensor": QuantSpec("fp8_e4m3", "tensor"),
}
SHAPE = (48, 96)  # 3 x 6 groups of 16


def partitions(size: int) -> dict[str, Partition]:
    return {
        "even-2": split_units(size, 2, 16),
        "padded-4x16": split_units(size, 4, 16),  # 6 units at world 4: two ranks padded
        "padded-5x16": split_units(size, 5, 16),  # a rank holding padding only
        "regrouped-4x16": split_regrouped(size, 4, 16),  # groups cut by rank boundaries
        "cuts-groups": split_units(size, 4),  # size/4 per rank (12 or 24): cuts groups of 16
    }


def _check_pieces(full: QuantWeight, pieces: list[QuantWeight], part: Partition, dim: int) -> None:
    want = oracle(full)
    seen = torch.zeros(want.shape[dim], dtype=torch.long)
    for rank, piece in enumerate(pieces):
        got = oracle(piece)
        index = part.index(rank)
        real = index >= 0
        picked = got.index_select(dim, torch.nonzero(real).flatten())
        assert torch.equal(picked, want.index_select(dim, index[real])), f"rank {rank}: real entries differ"
        padded = got.index_select(dim, torch.nonzero(~real).flatten())
        assert bool((padded == 0).all()), f"rank {rank}: padding does not dequantize to zero"
        seen.index_add_(0, index[real], torch.ones(int(real.sum()), dtype=torch.long))
    assert bool((seen >= 1).all()), "some entries are on no rank"


@pytest.mark.parametrize("part_name", sorted(partitions(48)))
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_column_shards_reassemble_and_pad_with_zeros(spec_name: str, part_name: str) -> None:
    spec = SPECS[spec_name]
    full = random_weight(spec, *SHAPE)
    part = partitions(SHAPE[0])[part_name]
    try:
        pieces = [shard_quant(full, "column", part, r, "w") for r in range(part.world)]
    except UnsupportedError as exc:
        pytest.fail(f"column split refused: {exc}")
    for piece in pieces:
        assert piece.spec == local_spec(spec, "column", part, "w")  # what preflight predicts
        assert piece.shape == (part.local_size, SHAPE[1])
    _check_pieces(full, pieces, part, 0)


@pytest.mark.parametrize("part_name", sorted(partitions(96)))
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_row_shards_reassemble_and_pad_with_zeros(spec_name: str, part_name: str) -> None:
    spec = SPECS[spec_name]
    full = random_weight(spec, *SHAPE, seed=1)
    part = partitions(SHAPE[1])[part_name]
    pieces = [shard_quant(full, "row", part, r, "w") for r in range(part.world)]
    for piece in pieces:
        assert piece.spec == local_spec(spec, "row", part, "w")
        assert piece.shape == (SHAPE[0], part.local_size)
    _check_pieces(full, pieces, part, 1)


def test_row_parallel_partial_products_sum_to_the_whole() -> None:
    """sum over ranks of x_r @ W_r.T == x @ W.T, x_r = this rank's input columns (zeros at padding)."""
    full = random_weight(SPECS["uint4-g16-asym"], *SHAPE, seed=2)
    part = split_regrouped(SHAPE[1], 4, 16)
    x = torch.randn(5, SHAPE[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(5, SHAPE[0], dtype=torch.float64)
    for rank in range(4):
        index = part.index(rank)
        x_r = torch.where(index >= 0, x[:, index.clamp(min=0)], 0.0)
        total += x_r @ oracle(shard_quant(full, "row", part, rank, "w")).T
    torch.testing.assert_close(total, x @ oracle(full).T, rtol=1e-12, atol=1e-12)


def test_split_groups_keep_their_scale_by_refining() -> None:
    """24 input features per rank cut groups of 16: local groups of 8 share the original scales."""
    spec = SPECS["uint4-g16-asym"]
    refined = local_spec(spec, "row", split_units(96, 4), "w")
    assert refined == QuantSpec("uint4", "group", group_size=8, has_zero=True)
    with pytest.raises(UnsupportedError, match="smaller than 8"):
        local_spec(spec, "row", split_units(96, 16), "w")  # 6 per rank: no group of >= 8 fits


def test_fp8_block_rows_refine_to_finer_blocks() -> None:
    spec = SPECS["fp8-block16"]
    assert local_spec(spec, "column", split_units(48, 6), "w") == spec  # 8 rows: inside one block
    refined = local_spec(spec, "column", split_units(48, 4), "w")  # rows 12..23 straddle blocks 0 and 1
    assert refined is not None and refined.block_shape == (4, 16)


def test_act_order_row_shard_keeps_only_used_groups() -> None:
    full = random_weight(SPECS["uint4-g16-act-order"], 8, 64, seed=3)
    part = split_units(64, 2)
    piece = shard_quant(full, "row", part, 0, "w")
    used = torch.unique(full.group_index[:32].long())
    assert piece.scale.shape == (8, used.numel())
    assert torch.equal(piece.scale, full.scale[:, used])


def test_regrouped_split_matches_the_formats_md_example() -> None:
    """formats.md §10.4: K=768, G=128, tp=4: rank 0 = g0 + half g1, rank 1 = half g1 + g2, ..."""
    part = split_regrouped(768, 4, 128)
    assert part.local_size == 256
    assert part.shards[0] == (Segment(0, 128, 0), Segment(128, 64, 64))
    assert part.shards[1] == (Segment(192, 64, 64), Segment(256, 128, 0))
    assert part.shards[2] == (Segment(384, 128, 0), Segment(512, 64, 64))
    assert part.shards[3] == (Segment(576, 64, 64), Segment(640, 128, 0))


def test_whole_group_split_of_qwen2_72b_intermediate() -> None:
    """29568 = 231 groups of 128: 116 groups per rank at tp 2, the second padded by one zero group."""
    part = split_units(29568, 2, 128)
    assert part.local_size == 14848
    assert [part.padding(r) for r in range(2)] == [0, 128]
    part4 = split_units(29568, 4, 128)
    assert part4.local_size == 58 * 128
    assert sum(part4.local_size - part4.padding(r) for r in range(4)) == 29568


def test_kv_heads_are_replicated_when_fewer_than_ranks() -> None:
    part = split_kv_heads(2, 8, 4, "attn")
    assert [part.index(r).tolist() for r in range(4)] == [[0], [0], [1], [1]]
    assert split_kv_heads(8, 8, 4, "attn").local_size == 2
    with pytest.raises(UnsupportedError, match="3 KV heads"):
        split_kv_heads(3, 12, 4, "attn")


def test_heads_must_divide() -> None:
    with pytest.raises(UnsupportedError, match="4 attention heads cannot be split over 3 ranks"):
        split_heads(4, 3, "model.layers.0.self_attn")


def test_dense_shards_and_segment_reads_agree() -> None:
    dense = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    part = split_units(10, 4, 2)  # 5 units of 2 -> 4 per rank, last rank all padding
    for rank in range(4):
        cut = shard_dense(dense, "column", part, rank)
        read = gather_segments(part, rank, lambda a, b: dense[a:b], 0, dense[:0])
        assert torch.equal(cut, read)
        index = part.index(rank)
        assert torch.equal(cut[index >= 0], dense[index[index >= 0]])
        assert bool((cut[index < 0] == 0).all())
        assert torch.equal(shard_vector(dense[:, 0], part, rank), cut[:, 0])
    assert torch.equal(shard_dense(dense, "row", split_units(6, 4), 2), dense[:, 4:6])
    assert torch.equal(shard_dense(dense, "row", split_units(6, 4), 3), torch.zeros(10, 2))


def test_an_act_order_row_shard_asks_for_the_reference_kernel() -> None:
    act_order = QuantSpec("uint4", "group", group_size=32, has_zero=True, act_order=True)
    plain = QuantSpec("uint4", "group", group_size=32, has_zero=True)
    assert needs_reference_kernel("row", act_order)
    assert shard_kernel("row", act_order, None) == "reference"
    assert shard_kernel("row", act_order, "cpu_int4") == "cpu_int4"  # a kernel the user named wins
    assert not needs_reference_kernel("column", act_order)  # column shards keep whole rows
    assert shard_kernel("column", act_order, None) is None
    assert shard_kernel("row", plain, None) is None
    assert shard_kernel("row", None, None) is None
