"""The tensor-parallel plan: how every layer of a model splits over N ranks, from headers only.

Owns turning the layers' declared split groups (heads, KV heads, MLP/expert channels, vocab) and
the stored specs into partitions, each layer's local shape and spec, the padding applied, the
checks that refuse what cannot be split exactly, and the known numerical risks. With expert
parallelism, routed experts are not split but placed whole on ranks (`experts`, `expert_owner`). The loader
executes this plan; `inspect --tp N` prints it, so both say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from anyquant.errors import AnyquantError, UnsupportedError
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer
from anyquant.layers.moe import SparseMoE
from anyquant.models.protocol import CausalLM
from anyquant.parallel.partition import (
    ExpertPlacement,
    Partition,
    divisors,
    place_experts,
    split_heads,
    split_kv_heads,
    split_units,
)
from anyquant.parallel.state import ParallelState
from anyquant.quant.formats.base import QuantFormat
from anyquant.quant.shard_rules import (
    ShardStyle,
    column_unit,
    local_spec,
    needs_reference_kernel,
    row_unit,
)
from anyquant.quant.spec import QuantSpec

SpecOf = Callable[[QuantLinear], "QuantSpec | None"]


@dataclass(frozen=True)
class LinearShard:
    """One linear layer's cut: style, partition of its split dimension, what each rank holds."""

    style: ShardStyle
    partition: Partition  # over the split dimension's features (rows for column, columns for row)
    local_shape: tuple[int, int]  # (out, in) on every rank, padding included
    local_spec: QuantSpec | None
    group: str  # name of the split group, for messages


@dataclass(frozen=True, eq=False)
class SplitPlan:
    owner: TensorParallelLayer
    group: SplitGroup
    partition: Partition  # over the group's units (heads or channels)
    unit: int  # channels that stay together (group size, FP8 block), 1 for heads


@dataclass
class TensorParallelPlan:
    world: int
    splits: list[SplitPlan]
    shards: dict[str, LinearShard]  # by layer prefix; absent: replicated
    cache_heads: int | None  # KV-cache heads per rank
    risks: list[str] = field(default_factory=list)
    # Expert parallelism: MoE block prefix -> where its routed experts live, and each routed
    # expert's linear layer prefix -> the one rank that holds it whole. Empty without it.
    experts: dict[str, ExpertPlacement] = field(default_factory=dict)
    expert_owner: dict[str, int] = field(default_factory=dict)

    def holds(self, prefix: str, rank: int) -> bool:
        """Whether `rank` loads linear layer `prefix` (every rank does, but for placed experts)."""
        owner = self.expert_owner.get(prefix)
        return owner is None or owner == rank

    def padded_splits(self) -> list[SplitPlan]:
        return [s for s in self.splits if any(s.partition.padding(r) for r in range(self.world))]


def spec_lookup(fmt: QuantFormat | None) -> SpecOf:
    def spec_of(layer: QuantLinear) -> QuantSpec | None:
        return fmt.spec_for(layer.prefix, layer.kind) if fmt is not None else None

    return spec_of


def _partition(group: SplitGroup, world: int, spec_of: SpecOf) -> tuple[Partition, int]:
    if group.role == "heads":
        return split_heads(group.units, world, group.name), 1
    if group.role == "kv_heads":
        return split_kv_heads(group.units, group.query_heads, world, group.name), 1
    # Channels (MLP / expert intermediate, vocab) are cut at whole groups / blocks of every member
    # and zero-padded to equal lengths: padded rows give exact zeros that padded columns multiply.
    unit = 1
    for layer, _ in group.columns:
        unit = math.lcm(unit, column_unit(spec_of(layer)))
    for layer, _ in group.rows:
        unit = math.lcm(unit, row_unit(spec_of(layer)))
    return split_units(group.units, world, unit), unit


def _layer_shard(
    layer: QuantLinear, style: ShardStyle, width: int, units: Partition, group: SplitGroup, spec_of: SpecOf
) -> LinearShard:
    part = units if width == 1 else units.scaled(width)
    out_features, in_features = layer.shape
    split = out_features if style == "column" else in_features
    if part.size != split:
        raise AnyquantError(
            f"{layer.prefix}: split group {group.name} covers {part.size} features, layer has {split}"
        )
    spec = local_spec(spec_of(layer), style, part, layer.prefix)
    shape = (part.local_size, in_features) if style == "column" else (out_features, part.local_size)
    return LinearShard(style, part, shape, spec, group.name)


def check_expert_parallel(model: CausalLM) -> None:
    """Expert parallelism needs routed experts: a dense model is refused, naming why."""
    if not any(isinstance(m, SparseMoE) for m in model.modules()):
        name = type(model).__name__
        raise UnsupportedError(
            f"expert parallelism was asked for, but {name} has no mixture-of-experts layers (a dense "
            "model); leave --enable-expert-parallel off (tensor parallelism splits every layer)"
        )


def place_model_experts(model: CausalLM, world: int) -> tuple[dict[str, ExpertPlacement], dict[str, int]]:
    """Every MoE block's expert placement, and the owner rank of each routed expert's linears."""
    check_expert_parallel(model)
    placements: dict[str, ExpertPlacement] = {}
    owner: dict[str, int] = {}
    for module in model.modules():
        if not isinstance(module, SparseMoE):
            continue
        placement = place_experts(module.routing.num_experts, world, module.prefix)
        placements[module.prefix] = placement
        for e, expert in enumerate(module.experts):
            rank = placement.owner(e)
            for layer in expert.modules():
                if isinstance(layer, QuantLinear):
                    owner[layer.prefix] = rank
    return placements, owner


def plan_tensor_parallel(
    model: CausalLM, spec_of: SpecOf, world: int, expert_parallel: bool = False
) -> TensorParallelPlan:
    """Plan world ranks for a model built on the meta device (global shapes, before any shard).
    `expert_parallel`: routed experts are placed whole on ranks instead of split inside.

    Raises UnsupportedError, with the numbers, when the model cannot be split exactly."""
    if world < 1:
        raise UnsupportedError(f"tensor_parallel_size must be at least 1, got {world}")
    placements, owner = place_model_experts(model, world) if expert_parallel else ({}, {})
    placed = {
        id(e)
        for m in model.modules()
        if isinstance(m, SparseMoE) and m.prefix in placements
        for e in m.experts
    }
    splits: list[SplitPlan] = []
    shards: dict[str, LinearShard] = {}
    cache_heads: set[int] = set()
    for module in model.modules():
        if not isinstance(module, TensorParallelLayer):
            continue
        if id(module) in placed:
            continue  # a routed expert placed whole on its owner: never split
        for group in module.split_groups():
            units, unit = _partition(group, world, spec_of)
            splits.append(SplitPlan(module, group, units, unit))
            if group.cached:
                cache_heads.add(units.local_size)
            members: list[tuple[QuantLinear, ShardStyle, int]] = [
                *((lay, "column", w) for lay, w in group.columns),
                *((lay, "row", w) for lay, w in group.rows),
            ]
            for layer, style, width in members:
                if layer.prefix in shards:
                    raise AnyquantError(f"{layer.prefix} belongs to two tensor-parallel split groups")
                shards[layer.prefix] = _layer_shard(layer, style, width, units, group, spec_of)
    for module in model.modules():
        if (
            isinstance(module, QuantLinear)
            and module.style != "replicated"
            and module.prefix not in shards
            and module.prefix not in owner
        ):
            raise AnyquantError(f"{module.prefix}: {module.style}-parallel layer outside any split group")
    if len(cache_heads) > 1:
        raise UnsupportedError(
            f"layers keep different numbers of KV-cache heads per rank: {sorted(cache_heads)}"
        )
    plan = TensorParallelPlan(world, splits, shards, next(iter(cache_heads), None), [], placements, owner)
    plan.risks = _risks(model, plan, spec_of)
    return plan


def _risks(model: CausalLM, plan: TensorParallelPlan, spec_of: SpecOf) -> list[str]:
    if plan.world == 1:
        return []
    # Dynamic activation scales are no risk: row-parallel layers max-reduce per-token / per-tensor
    # amaxes, and per-group ones where a split cuts groups, over ranks (layers/linear.py).
    act_order = []
    for layer in model.modules():
        if not isinstance(layer, QuantLinear) or layer.prefix not in plan.shards:
            continue
        spec = spec_of(layer)
        if needs_reference_kernel(plan.shards[layer.prefix].style, spec):
            act_order.append(layer.prefix)
    risks = []
    if act_order:
        risks.append(
            f"{len(act_order)} row-parallel act-order layers (e.g. {act_order[0]}) keep, per rank, the "
            "groups their columns use; they run on the reference kernel (slow), since fast kernels need "
            "whole contiguous groups"
        )
    return risks


def apply_tensor_parallel(model: CausalLM, plan: TensorParallelPlan, state: ParallelState) -> None:
    """Turn the (meta) model into this rank's shard: local layer shapes, heads and embedding."""
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.prefix in plan.shards:
            module.parallelize(plan.shards[module.prefix].local_shape, state)
    own: dict[int, dict[str, Partition]] = {}
    for split in plan.splits:
        own.setdefault(id(split.owner), {})[split.group.role] = split.partition
    for module in model.modules():
        if isinstance(module, TensorParallelLayer):
            module.set_parallel(own.get(id(module), {}), state)
    for module in list(model.modules()):
        if isinstance(module, SparseMoE) and module.prefix in plan.experts:
            module.hold_experts(plan.experts[module.prefix], state.rank)
    if plan.cache_heads is not None:
        model.cache_shape = replace(model.cache_shape, num_kv_heads=plan.cache_heads)


def query_heads(model: CausalLM) -> int | None:
    for module in model.modules():
        if isinstance(module, TensorParallelLayer):
            for group in module.split_groups():
                if group.role == "heads":
                    return group.units
    return None


def tensor_parallel_sizes(model: CausalLM, spec_of: SpecOf, limit: int = 64) -> dict[int, str | None]:
    """Candidate sizes (divisors of the query-head count, up to `limit`) -> None if it works, else why."""
    heads = query_heads(model) or 1
    result: dict[int, str | None] = {}
    for size in divisors(heads):
        if size > limit:
            break
        try:
            plan_tensor_parallel(model, spec_of, size)
            result[size] = None
        except AnyquantError as exc:
            result[size] = str(exc)
    return result


def padding_report(plan: TensorParallelPlan, pattern: Callable[[str], str]) -> list[dict[str, Any]]:
    """Padded splits grouped by layer pattern (all experts of a layer share one line)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for split in plan.padded_splits():
        g = split.group
        key = (pattern(g.name), g.role)
        pads = [split.partition.padding(r) for r in range(plan.world)]
        entry = rows.setdefault(
            key,
            {
                "pattern": key[0],
                "role": g.role,
                "count": 0,
                "size": g.units,
                "unit": split.unit,
                "local_size": split.partition.local_size,
                "padding_per_rank": pads,
                "layers": [lay.prefix for lay, _ in (*g.columns, *g.rows)],
            },
        )
        entry["count"] += 1
    return list(rows.values())
