"""Which projections of one input (q/k/v, gate/up) load as one merged weight, from headers only.

The model declares the candidates (`MergeableProjections.projection_groups`); this module decides,
for this rank's shards, whether their weights can be stacked (`anyquant.quant.merge`) and whether
the kernel chosen for the stacked shape is the one each member would get alone: merging must not
change which kernel computes a row, so merged and unmerged logits are the same. `inspect` shows
the decision and the reason for every group kept apart; the loader executes it and may still
keep a group apart when the values disagree (act-order group indices, static activation scales).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anyquant.errors import UnsupportedError
from anyquant.layers.linear import MergeableProjections, ProjectionGroup
from anyquant.loading.plan import LayerPlan
from anyquant.models.protocol import CausalLM
from anyquant.quant.merge import merged_spec, spec_refusal
from anyquant.quant.registry import choose_kernel
from anyquant.quant.spec import layer_compute_dtype


@dataclass(frozen=True)
class MergePlan:
    group: ProjectionGroup
    members: tuple[LayerPlan, ...]
    kernel: str  # the kernel of the merged weight (or of every member when kept apart)
    refusal: str | None  # None: merged

    @property
    def prefix(self) -> str:
        return self.group.prefix

    @property
    def local_shape(self) -> tuple[int, int]:
        return (sum(p.local_shape[0] for p in self.members), self.members[0].local_shape[1])


def plan_merges(
    model: CausalLM,
    plans: Sequence[LayerPlan],
    device: torch.device,
    compute_dtype: torch.dtype,
    prefer_kernel: str | None = None,
    enabled: bool = True,
) -> list[MergePlan]:
    """One plan per declared projection group, merged or kept apart with the reason."""
    by_prefix = {p.prefix: p for p in plans}
    merges = []
    for module in model.modules():
        if not isinstance(module, MergeableProjections):
            continue
        for group in module.projection_groups():
            members = tuple(by_prefix[m.prefix] for m in group.members)
            refusal = _refusal(members, device, compute_dtype, prefer_kernel) if enabled else "merging is off"
            merges.append(MergePlan(group, members, members[0].kernel.name, refusal))
    return merges


def _refusal(
    members: tuple[LayerPlan, ...],
    device: torch.device,
    compute_dtype: torch.dtype,
    prefer: str | None,
) -> str | None:
    names = [p.prefix.rsplit(".", 1)[-1] for p in members]
    if any(p.shard is not None and p.shard.style != "column" for p in members):
        return "not all are column-split"
    kernels = {p.kernel.name for p in members}
    if len(kernels) > 1:
        chosen = ", ".join(f"{n}: {p.kernel.name}" for n, p in zip(names, members))
        return f"they run on different kernels ({chosen})"
    specs = [p.kernel_spec for p in members]  # with activations quantized at load, if any
    reason = spec_refusal(names, specs, [p.local_shape[0] for p in members])
    if reason is not None:
        return reason
    spec = None if specs[0] is None else merged_spec(specs[0])
    shape = (sum(p.local_shape[0] for p in members), members[0].local_shape[1])
    dtype = layer_compute_dtype(members[0].kind, compute_dtype)
    try:
        merged = choose_kernel(spec, members[0].kind, device, shape, dtype, prefer=prefer if spec else None)
    except UnsupportedError as exc:
        return f"no kernel runs the merged {list(shape)} weight: {exc}"
    if merged.name not in kernels:
        # Another kernel would round differently: keep the logits those of the separate layers.
        return f"the merged {list(shape)} weight would run on {merged.name}, each member on {kernels.pop()}"
    return None


def merged_layers(merges: Sequence[MergePlan]) -> dict[str, MergePlan]:
    """Member prefix -> its merge plan, for the groups that merge."""
    return {p.prefix: m for m in merges if m.refusal is None for p in m.members}
