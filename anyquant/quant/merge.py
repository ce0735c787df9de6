"""Merging projections of one input (q/k/v, gate/up) into one weight along the output features.

A merged weight is multiplied by one kernel call instead of several; its output rows are the
members' rows in order, so every output equals the unmerged layer's exactly as long as the
kernel computes each output row on its own (every kernel here does: one dot product per row).
This module owns when canonical weights can be concatenated and how, from the specs (headers)
and then from the values (act-order group indices, static activation scales); it never decides
which layers are merged (the model declares them) or which kernel runs them (the registry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight


def merged_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of a merged weight: one scale per tensor becomes one per output channel (each
    member keeps its own scale on its rows, so the dequantized values are unchanged)."""
    return replace(spec, granularity="channel") if spec.granularity == "tensor" else spec


def spec_refusal(
    names: Sequence[str], specs: Sequence[QuantSpec | None], out_features: Sequence[int]
) -> str | None:
    """Why weights of these specs and output sizes cannot be concatenated, or None (headers only)."""
    quantized = [s is not None for s in specs]
    if any(quantized) and not all(quantized):
        what = ", ".join(f"{n}: {s.describe() if s else 'unquantized'}" for n, s in zip(names, specs))
        return f"some are quantized and some are not ({what})"
    first = specs[0]
    if first is None:
        return None
    for name, spec in zip(names[1:], specs[1:]):
        if spec != first:
            assert spec is not None
            return (
                f"their schemes differ ({names[0]}: {first.describe()}, {name}: {spec.describe()}; "
                "a per-module override)"
            )
    if first.granularity == "block":
        rows = first.block_shape[0]
        for name, n in zip(names[:-1], out_features[:-1]):
            if n % rows:
                return f"{name} has {n} output rows, not a multiple of the {rows}-row scale blocks"
    return None


def concat_out_features(
    names: Sequence[str], weights: Sequence[QuantWeight | Tensor]
) -> tuple[QuantWeight | Tensor | None, str | None]:
    """(the members' weights stacked along out_features, None), or (None, why they cannot be).

    Dense weights are concatenated as they are. Quantized ones need the same spec (checked on
    the headers already), the same act-order group index (the input columns are permuted once
    for all rows) and the same static activation scale (the input is quantized once)."""
    if all(isinstance(w, Tensor) for w in weights):
        dense = [w for w in weights if isinstance(w, Tensor)]
        if len({w.dtype for w in dense}) > 1:
            return None, "their stored dtypes differ"
        return torch.cat(dense, dim=0), None
    quant = [w for w in weights if isinstance(w, QuantWeight)]
    if len(quant) != len(weights):
        return None, "some are quantized and some are not"
    first = quant[0]
    reason = spec_refusal(names, [w.spec for w in quant], [w.shape[0] for w in quant])
    if reason is not None:
        return None, reason
    if any(w.num_experts is not None for w in quant):
        return None, "stacked expert weights are not merged"
    for name, w in zip(names[1:], quant[1:]):
        if w.shape[1] != first.shape[1] or w.scale.shape[1:] != first.scale.shape[1:]:
            return None, f"their input columns or scale groups differ ({names[0]} vs {name})"
        for attr, what in (
            ("group_index", "act-order group indices"),
            ("input_scale", "static activation scales"),
            ("input_zero", "static activation zero points"),
        ):
            a, b = getattr(first, attr), getattr(w, attr)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                return None, f"their {what} differ ({names[0]} vs {name})"
    spec = merged_spec(first.spec)
    per_tensor = first.spec.granularity == "tensor"

    def per_row(w: QuantWeight, t: Tensor) -> Tensor:
        return t.reshape(1).expand(w.shape[0]) if per_tensor else t

    zeros = None
    if first.zero is not None:  # the spec is shared, so every member stores zero points
        zeros = torch.cat([per_row(w, w.zero) for w in quant if w.zero is not None])
    merged = QuantWeight(
        spec,
        (sum(w.shape[0] for w in quant), first.shape[1]),
        torch.cat([w.data for w in quant]),
        torch.cat([per_row(w, w.scale) for w in quant]).contiguous(),
        zeros,
        first.group_index,
        first.input_scale,
        first.input_zero,
        offset=(
            torch.cat([per_row(w, w.offset) for w in quant if w.offset is not None])
            if first.offset is not None  # GGUF k-quant minimums, shaped like the scales
            else None
        ),
    )
    return merged.validate("+".join(names)), None
