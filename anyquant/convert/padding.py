"""`--pad-for-tp N`: zero-pad MLP and expert intermediate sizes so N ranks split them evenly.

Owns the padding plan, computed from headers only (the model built on the meta device and each
layer's stored spec): which split groups grow, to what size, and the config.json fields that
say so. Padding goes at the end of the intermediate dimension; the gate/up rows added dequantize
to exactly zero, and so do the matching down-projection columns, so act(0) * 0 contributes 0 and
the logits are unchanged. The padded size P makes every rank's share P / N a whole number of
groups (and FP8 blocks, activation groups) of every member layer, and a multiple of `tile`
features, so neither our kernels nor tile-based GPU kernels (whose thread tiles span 64 output
and 128 input features) need padding of their own at that tensor-parallel size.

The cutting itself is `quant/shard_rules.py`'s exact zero padding (one home for it), applied with
a one-rank partition whose only segment is followed by the padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from anyquant.errors import UnsupportedError
from anyquant.layers.linear import QuantLinear, TensorParallelLayer
from anyquant.models.protocol import CausalLM
from anyquant.parallel.partition import (
    Partition,
    Segment,
)
from anyquant.quant.shard_rules import (
    ShardStyle,
    column_unit,
    row_unit,
    shard_dense,
    shard_quant,
    shard_vector,
)
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight

SpecOf = Callable[[QuantLinear], "QuantSpec | None"]
DEFAULT_TILE = 128
# config.json fields that hold an intermediate size, in the order they are matched.
SIZE_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
_NESTED = ("text_config", "llm_config", "language_config", "thinker_config")


@dataclass(frozen=True)
class PaddedGroup:
    name: str  # the split group, e.g. "model.layers.0.mlp"
    size: int
    padded: int
    unit: int  # per-rank shares are whole multiples of this
    columns: tuple[str, ...]  # layers whose output rows are the dimension (gate, up)
    rows: tuple[str, ...]  # layers whose input columns are the dimension (down)


@dataclass
class PaddingPlan:
    world: int
    tile: int
    groups: list[PaddedGroup] = field(default_factory=list)
    fields: dict[str, tuple[int, int]] = field(default_factory=dict)  # config field -> (old, new)
    _by_layer: dict[str, tuple[ShardStyle, PaddedGroup]] = field(default_factory=dict)

    def layer(self, prefix: str) -> tuple[ShardStyle, PaddedGroup] | None:
        """How `prefix` is padded: its style (column: rows grow, row: columns grow) and group."""
        return self._by_layer.get(prefix)

    def padded_shape(self, prefix: str, shape: tuple[int, int]) -> tuple[int, int]:
        found = self.layer(prefix)
        if found is None:
            return shape
        style, group = found
        return (group.padded, shape[1]) if style == "column" else (shape[0], group.padded)

    def describe(self) -> list[str]:
        sizes = sorted({(g.size, g.padded, g.unit) for g in self.groups})
        lines = [
            f"{old} -> {new} ({new // self.world} per rank at TP {self.world}, whole units of {unit})"
            for old, new, unit in sizes
        ]
        lines += [f"config.json {key}: {old} -> {new}" for key, (old, new) in self.fields.items()]
        return lines


def plan_padding(
    model: CausalLM, spec_of: SpecOf, config: dict[str, Any], world: int, tile: int
) -> PaddingPlan:
    """The padding that makes every MLP / expert intermediate dimension split into `world` equal
    shares of whole units. Raises UnsupportedError when a padded size has no config.json field."""
    if world < 1 or tile < 1:
        raise UnsupportedError(f"--pad-for-tp needs a positive size and tile, got {world} and {tile}")
    found: list[tuple[str, int, int, tuple[str, ...], tuple[str, ...]]] = []
    units: dict[int, int] = {}
    for module in model.modules():
        if not isinstance(module, TensorParallelLayer):
            continue
        for group in module.split_groups():
            if group.role != "channels":
                continue
            unit = tile
            for layer, _ in group.columns:
                unit = math.lcm(unit, column_unit(spec_of(layer)))
            for layer, _ in group.rows:
                unit = math.lcm(unit, row_unit(spec_of(layer)))
            cols = tuple(layer.prefix for layer, _ in group.columns)
            rows = tuple(layer.prefix for layer, _ in group.rows)
            found.append((group.name, group.units, unit, cols, rows))
            # Groups of one size share one padded size (config.json has one field for them all).
            units[group.units] = math.lcm(units.get(group.units, 1), unit)
    plan = PaddingPlan(world, tile)
    padded_of = {size: -(-size // (world * unit)) * world * unit for size, unit in units.items()}
    text = _text_config(config)
    for key in SIZE_FIELDS:
        value = text.get(key)
        if isinstance(value, int) and value in padded_of and padded_of[value] != value:
            plan.fields[key] = (value, padded_of[value])
    expressed = {old for old, _ in plan.fields.values()}
    for name, size, _, cols, rows in found:
        padded = padded_of[size]
        if padded == size:
            continue
        if size not in expressed:
            raise UnsupportedError(
                f"{name}: intermediate size {size} would be padded to {padded}, but no config.json field "
                f"({', '.join(SIZE_FIELDS)}) holds {size}, so the padded size cannot be written"
            )
        padded_group = PaddedGroup(name, size, padded, units[size], cols, rows)
        plan.groups.append(padded_group)
        for prefix in cols:
            plan._by_layer[prefix] = ("column", padded_group)
        for prefix in rows:
            plan._by_layer[prefix] = ("row", padded_group)
    return plan


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    for key in _NESTED:
        sub = config.get(key)
        if isinstance(sub, dict) and "hidden_size" in sub:
            return sub
    return config


def padded_config(config: dict[str, Any], plan: PaddingPlan) -> dict[str, Any]:
    """config.json with the padded sizes (in the nested text config where the sizes live)."""
    out = dict(config)
    text = _text_config(config)
    target = out
    for key in _NESTED:
        if config.get(key) is text:
            target = out[key] = dict(text)
    for key, (_, new) in plan.fields.items():
        target[key] = new
    return out


def _partition(group: PaddedGroup) -> Partition:
    return Partition(group.size, ((Segment(0, group.size, group.padded - group.size),),))


def pad_weight(weight: QuantWeight | Tensor, prefix: str, plan: PaddingPlan) -> QuantWeight | Tensor:
    """The layer's weight with its intermediate dimension zero-padded (unchanged when not padded)."""
    found = plan.layer(prefix)
    if found is None:
        return weight
    style, group = found
    if isinstance(weight, QuantWeight):
        return shard_quant(weight, style, _partition(group), 0, prefix)
    return shard_dense(weight, style, _partition(group), 0)


def pad_bias(bias: Tensor, prefix: str, plan: PaddingPlan) -> Tensor:
    """A gate/up bias grows with the rows (zeros); a down bias is per output and stays."""
    found = plan.layer(prefix)
    if found is None or found[0] != "column":
        return bias
    return shard_vector(bias, _partition(found[1]), 0)
