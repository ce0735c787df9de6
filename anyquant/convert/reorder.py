"""`--allow-reorder`: turn an act-order down projection into plain groups by permuting the MLP's
intermediate dimension.

GPTQ act-order maps input column j to group g_idx[j]. Sorting the columns by group makes the
groups contiguous (g_idx becomes column // group_size), which formats without act-order can
store. Permuting a layer's inputs is exact only when the layer producing those inputs permutes
its outputs the same way: true for a gated MLP, down(act(gate(x)) * up(x)), whose activation is
elementwise, so gate/up rows (and biases) follow the same permutation. Every other layer reads
the hidden state shared by the whole model and cannot be permuted on its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anyquant.layers.linear import TensorParallelLayer
from anyquant.models.protocol import CausalLM
from anyquant.quant.weight import QuantWeight

if TYPE_CHECKING:
    from anyquant.loading.plan import LayerPlan


def sorting_permutation(weight: QuantWeight) -> Tensor | str:
    """The input permutation that makes `weight`'s act-order groups contiguous, or why none does."""
    gi = weight.group_index
    if gi is None or gi.dim() != 1:
        return "no single act-order index to sort (stacked experts or none)"
    perm = torch.argsort(gi.to(torch.int64), stable=True)
    want = torch.arange(gi.numel()) // weight.spec.group_size
    if not bool((gi.to(torch.int64)[perm] == want).all()):
        return f"its act-order groups do not all hold {weight.spec.group_size} columns"
    return perm


def permute_inputs(weight: QuantWeight, perm: Tensor) -> QuantWeight:
    """Columns reordered by `perm`; the sorted index is trivial, so act-order is dropped."""
    data = weight.data.index_select(-1, perm)
    spec = replace(weight.spec, act_order=False)
    return replace(weight, spec=spec, data=data, group_index=None)


def permute_outputs(weight: QuantWeight | Tensor, perm: Tensor, name: str) -> QuantWeight | Tensor | str:
    """Rows reordered by `perm` (a producer of the permuted dimension), or why it cannot be."""
    if not isinstance(weight, QuantWeight):
        return weight.index_select(0, perm)
    spec = weight.spec
    if spec.granularity == "block":
        return f"{name}: block scales span {spec.block_shape[0]} rows, which a permutation breaks up"
    data = weight.data.index_select(-2, perm)
    scale, zero = weight.scale, weight.zero
    if spec.granularity == "channel":
        scale = scale.index_select(-1, perm)
        zero = None if zero is None else zero.index_select(-1, perm)
    elif spec.granularity == "group":
        scale = scale.index_select(-2, perm)
        zero = None if zero is None else zero.index_select(-2, perm)
    return replace(weight, data=data, scale=scale, zero=zero)


# -- which layers feed which: the permutable MLP intermediate dimensions -------------------------


def mlp_producers(model: CausalLM) -> dict[str, tuple[str, ...]]:
    """down projection prefix -> the gate/up prefixes producing its input (channel split groups)."""
    out: dict[str, tuple[str, ...]] = {}
    for module in model.modules():
        if isinstance(module, TensorParallelLayer):
            for group in module.split_groups():
                if group.role == "channels":
                    for layer, _ in group.rows:
                        out[layer.prefix] = tuple(lay.prefix for lay, _ in group.columns)
    return out


def down_first(plans: list[LayerPlan], producers: dict[str, tuple[str, ...]]) -> list[LayerPlan]:
    """Model order, except that a down projection comes before its gate/up (its permutation, if
    any, is known before their rows are written)."""
    by_prefix = {p.prefix: p for p in plans}
    consumer = {col: down for down, cols in producers.items() for col in cols}
    done: set[str] = set()
    ordered = []
    for plan in plans:
        down = consumer.get(plan.prefix)
        if down is not None and down not in done and down in by_prefix:
            ordered.append(by_prefix[down])
            done.add(down)
        if plan.prefix not in done:
            ordered.append(plan)
            done.add(plan.prefix)
    return ordered
