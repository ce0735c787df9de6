"""Tensor-parallel partition arithmetic: which entries of one split dimension each rank holds.

Owns `Partition` (per rank, which global entries it holds and where zero padding goes) and its
builders: whole units with padding, heads with KV-head replication, and the regrouped split of
formats.md §10.4. Pure integer arithmetic on sizes: it knows nothing about weights, formats or
modules, so layers and models can name a `Partition` without depending on the loader. Cutting
weights by a partition is `quant/shard_rules.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor

from anyquant.errors import UnsupportedError


@dataclass(frozen=True)
class Segment:
    """`length` consecutive global entries from `start`, followed by `pad` zero entries."""

    start: int
    length: int
    pad: int = 0


@dataclass(frozen=True)
class Partition:
    """How one dimension of `size` entries is laid out on each rank (every rank the same length)."""

    size: int
    shards: tuple[tuple[Segment, ...], ...]  # per rank, in local order

    def __post_init__(self) -> None:
        lengths = {sum(s.length + s.pad for s in segs) for segs in self.shards}
        if len(lengths) != 1:
            raise ValueError(f"ranks of a partition must hold equally many entries, got {sorted(lengths)}")

    @property
    def world(self) -> int:
        return len(self.shards)

    @property
    def local_size(self) -> int:
        return sum(s.length + s.pad for s in self.shards[0])

    def padding(self, rank: int) -> int:
        return sum(s.pad for s in self.shards[rank])

    def index(self, rank: int) -> Tensor:
        """[local_size] int64: the global entry at each local position, -1 for padding."""
        return rank_index(self, rank).clone()

    def scaled(self, width: int) -> Partition:
        """The same split with every entry widened to `width` entries (heads -> channels)."""
        return Partition(
            self.size * width,
            tuple(
                tuple(Segment(s.start * width, s.length * width, s.pad * width) for s in segs)
                for segs in self.shards
            ),
        )

    def describe(self) -> str:
        pads = [self.padding(r) for r in range(self.world)]
        text = f"{self.size} -> {self.local_size} per rank"
        if any(pads):
            text += f" (zero padding per rank: {pads})"
        return text


@lru_cache(maxsize=4096)
def rank_index(partition: Partition, rank: int) -> Tensor:
    """`partition.index(rank)` without the copy: cached and shared, so callers must not modify it."""
    parts = []
    for s in partition.shards[rank]:
        parts.append(torch.arange(s.start, s.start + s.length, dtype=torch.long))
        parts.append(torch.full((s.pad,), -1, dtype=torch.long))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


# -- partition builders ------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def split_units(size: int, world: int, unit: int = 1) -> Partition:
    """Contiguous whole `unit`s per rank, zero-padded at the end to ceil(units / world) units.

    The smallest equal per-rank length made of whole units: e.g. 231 groups of 128 at world 2 give
    116 groups per rank, the second rank padded with one zero group (formats.md §10.4).
    """
    if world < 1 or unit < 1:
        raise ValueError(f"world ({world}) and unit ({unit}) must be positive")
    units = -(-size // unit)
    local = -(-units // world) * unit
    shards = []
    for rank in range(world):
        start = min(rank * local, size)
        length = max(0, min(size, start + local) - start)
        shards.append((Segment(start, length, local - length),))
    return Partition(size, tuple(shards))


@lru_cache(maxsize=1024)
def split_regrouped(size: int, world: int, group: int) -> Partition:
    """formats.md §10.4 regrouping: channels split evenly, each group a rank touches padded to whole.

    Rank r holds channels [r*size/world, (r+1)*size/world); every original group it touches
    becomes one local group (its real channels, then padding), so a group cut by a rank boundary
    keeps its scale on both sides. Ranks are padded to the longest with whole zero groups.
    """
    if world < 1 or group < 1:
        raise ValueError(f"world ({world}) and group ({group}) must be positive")
    shards: list[list[Segment]] = []
    for rank in range(world):
        begin, end = rank * size // world, (rank + 1) * size // world
        segs = []
        g = begin // group
        while g * group < end:
            lo, hi = max(begin, g * group), min(end, (g + 1) * group)
            segs.append(Segment(lo, hi - lo, group - (hi - lo)))
            g += 1
        shards.append(segs)
    local = max(sum(s.length + s.pad for s in segs) for segs in shards)
    for segs in shards:
        missing = local - sum(s.length + s.pad for s in segs)
        if missing:
            last = segs[-1] if segs else Segment(0, 0, 0)
            segs[-1:] = [replace(last, pad=last.pad + missing)]
    return Partition(size, tuple(tuple(segs) for segs in shards))


def split_heads(num_heads: int, world: int, what: str) -> Partition:
    """Whole heads per rank; heads cannot be padded away, so they must divide evenly."""
    if num_heads % world:
        raise UnsupportedError(
            f"{what}: {num_heads} attention heads cannot be split over {world} ranks "
            f"(tensor-parallel sizes that divide them: {', '.join(map(str, divisors(num_heads)))})"
        )
    return split_units(num_heads, world)


def split_kv_heads(num_kv_heads: int, num_heads: int, world: int, what: str) -> Partition:
    """KV heads split evenly, or replicated when there are fewer than ranks (formats.md §10.1).

    Replication gives rank r the KV head its query heads use: head r * num_kv_heads // world.
    """
    if num_kv_heads % world == 0:
        return split_units(num_kv_heads, world)
    if world % num_kv_heads == 0 and num_heads % world == 0:
        return Partition(num_kv_heads, tuple((Segment(r * num_kv_heads // world, 1),) for r in range(world)))
    raise UnsupportedError(
        f"{what}: {num_kv_heads} KV heads can neither be split over {world} ranks nor replicated "
        f"({world} is not a multiple of {num_kv_heads}); with {num_heads} query heads, tensor-parallel "
        f"sizes must divide {num_kv_heads} or be a multiple of it that divides {num_heads}"
    )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else [1]


# -- expert parallelism --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert parallelism: which whole routed experts each rank holds, as contiguous ranges.

    The first `num_experts % world` ranks hold one more: 60 experts at 4 ranks are 15 each, 11 at 4
    are 3, 3, 3, 2. Contiguous ranges keep a rank's experts one slice of the stacked layout and make
    "global id -> local id" a subtraction."""

    num_experts: int
    starts: tuple[int, ...]  # per rank, its first expert; rank r holds [starts[r], starts[r+1])

    @property
    def world(self) -> int:
        return len(self.starts)

    def experts(self, rank: int) -> range:
        stop = self.starts[rank + 1] if rank + 1 < self.world else self.num_experts
        return range(self.starts[rank], stop)

    def owner(self, expert: int) -> int:
        return max(r for r in range(self.world) if self.starts[r] <= expert)

    def describe(self) -> str:
        parts = []
        for r in range(self.world):
            held = self.experts(r)
            parts.append(
                f"rank {r}: {held.start}-{held.stop - 1}" if len(held) > 1 else f"rank {r}: {held.start}"
            )
        return f"{self.num_experts} experts over {self.world} ranks ({', '.join(parts)})"


def place_experts(num_experts: int, world: int, what: str) -> ExpertPlacement:
    """Whole experts per rank, as even as possible; every rank must hold at least one."""
    if world < 1:
        raise ValueError(f"world ({world}) must be positive")
    if num_experts < world:
        raise UnsupportedError(
            f"{what}: expert parallelism over {world} ranks needs at least one routed expert per rank, "
            f"the layer has {num_experts}; use a tensor-parallel size of at most {num_experts} or leave "
            "expert parallelism off (experts are then split inside)"
        )
    base, extra = divmod(num_experts, world)
    starts = tuple(r * base + min(r, extra) for r in range(world))
    return ExpertPlacement(num_experts, starts)
