"""`QuantLinear`: a linear layer whose math is delegated to the kernel chosen for its weight.

Owns the layer's identity (checkpoint prefix, kind, shape), its bias and its tensor-parallel
style: a row-parallel layer sums its ranks' partial outputs (and adds its bias once) and makes
dynamic per-token / per-tensor activation scales (and per-group ones where the split cuts groups)
span all ranks' input slices (one all-reduce MAX of the amax before quantizing, so TP N quantizes
exactly as one device), a vocab-parallel head gathers its ranks' logits on rank 0. It never looks at what the kernel holds (only at its
interface, e.g. `dynamic_act`): the loader hands it a ready kernel through `set_kernel`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from anyquant.layers.custom_ops import opaque_call
from anyquant.parallel.comm import all_reduce, all_reduce_max, gather_last_dim
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.reference import activation_amax
from anyquant.quant.spec import ActQuant, LayerKind

if TYPE_CHECKING:
    from anyquant.parallel.partition import Partition
    from anyquant.parallel.state import ParallelState

# replicated: every rank holds the whole weight; column: output features split; row: input
# features split, outputs summed over ranks; vocab: a column-split LM head gathered on rank 0.
ParallelStyle = Literal["replicated", "column", "row", "vocab"]
# heads / kv_heads: whole attention heads (never padded); channels / vocab: zero-paddable entries.
SplitRole = Literal["heads", "kv_heads", "channels", "vocab"]


class QuantLinear(nn.Module):
    def __init__(
        self,
        prefix: str,
        in_features: int,
        out_features: int,
        bias: bool = False,
        kind: LayerKind = "linear",
        style: ParallelStyle = "replicated",
        reduce_output: bool = True,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.in_features = in_features
        self.out_features = out_features
        self.kind: LayerKind = kind
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: LinearKernel | None = None
        self.style: ParallelStyle = style
        # Row style: sum over ranks here; False when the caller sums many such layers at once (MoE).
        self.reduce_output = reduce_output
        self.full_out_features = out_features  # vocab style: width of the gathered logits
        self.parallel: ParallelState | None = None  # set when this layer talks to other ranks
        # Row shard whose split cut dynamic activation groups: the original group of each local
        # group (-1: padding only) and how many original groups (`shard_rules.activation_group_map`).
        self.act_groups: tuple[Tensor, int] | None = None
        # Set when a captured step is prepared for a kernel Dynamo cannot trace: inside a
        # torch.compile trace the kernel then runs as one opaque op (layers/custom_ops.py).
        self.opaque_handle: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def set_kernel(self, kernel: LinearKernel) -> None:
        self.kernel = kernel

    def parallelize(self, shape: tuple[int, int], state: ParallelState) -> None:
        """Become this rank's shard, of local shape (out, in). A row layer keeps its whole bias."""
        out_features, in_features = shape
        if self.bias is not None and self.style != "row" and out_features != self.out_features:
            self.bias = nn.Parameter(torch.empty(out_features, device=self.bias.device), requires_grad=False)
        self.out_features, self.in_features = out_features, in_features
        self.parallel = state if self.style in ("row", "vocab") and state.is_parallel else None

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is None:
            raise RuntimeError(f"{self.prefix}: no weight loaded")
        if self.parallel is None:
            if self.opaque_handle is not None and torch.compiler.is_compiling():
                return opaque_call(self.opaque_handle, *((x,) if self.bias is None else (x, self.bias)))
            return self.kernel(x, self.bias)
        return self._parallel_forward(x, self.kernel, self.parallel, None)

    def forward_with_amax(self, x: Tensor, act_amax: Tensor) -> Tensor:
        """forward, given the all-rank amax of `x` for `global_act` (a caller that reduced many
        layers' amaxes in one collective: the MoE block, over its experts)."""
        if self.kernel is None or self.parallel is None:
            raise RuntimeError(f"{self.prefix}: an all-rank amax needs a loaded row-parallel layer")
        return self._parallel_forward(x, self.kernel, self.parallel, act_amax)

    @property
    def global_act(self) -> ActQuant | None:
        """The dynamic activation quantization whose amax must be taken over every rank's slice of
        the input features: a row-parallel split whose kernel scales per token or per tensor, or
        per group where the split cut groups (`act_groups`).

        None on one device, for other styles (their input is whole), for static or no activation
        quantization, and for per-group scales whose groups each lie whole on one rank: there a
        rank's own group amax is already the global one."""
        act = self.kernel.dynamic_act if self.kernel is not None else None
        if self.parallel is None or self.style != "row" or act is None:
            return None
        if act.granularity == "group" and self.act_groups is None:
            return None
        return act

    def local_act_amax(self, x: Tensor) -> Tensor | None:
        """This rank's amax of `x` for `global_act` (to be max-reduced over ranks), or None. Cut
        activation groups: [T, original groups], each the max over this rank's part of it."""
        act = self.global_act
        if act is None:
            return None
        amax = activation_amax(x, act)
        if self.act_groups is None:
            return amax
        groups, count = self.act_groups
        real = groups >= 0
        whole = amax.new_zeros(amax.shape[0], count)  # amaxes are >= 0: zero is neutral
        index = groups[real].expand(amax.shape[0], -1)
        return whole.scatter_reduce_(1, index, amax[:, real], "amax")

    def _local_groups_amax(self, reduced: Tensor) -> Tensor:
        """The all-rank amax laid out as this rank's kernel quantizes (its local groups)."""
        if self.act_groups is None:
            return reduced
        groups, _ = self.act_groups
        return torch.where(groups >= 0, reduced[:, groups.clamp(min=0)], 0.0)

    def _parallel_forward(
        self, x: Tensor, kernel: LinearKernel, state: ParallelState, act_amax: Tensor | None
    ) -> Tensor:
        if self.style == "vocab":
            return gather_last_dim(kernel(x, self.bias), state, self.full_out_features)
        if act_amax is None:
            local = self.local_act_amax(x)
            act_amax = None if local is None else all_reduce_max(local, state)
        if act_amax is not None:
            act_amax = self._local_groups_amax(act_amax)
        y = kernel(x, None) if act_amax is None else kernel(x, None, act_amax=act_amax)
        if self.reduce_output:
            y = all_reduce(y, state)
        elif state.rank != 0:
            return y  # the caller's sum adds rank 0's bias exactly once
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        style = "" if self.style == "replicated" else f", {self.style}"
        return (
            f"{self.prefix!r}, in={self.in_features}, out={self.out_features}, "
            f"bias={self.bias is not None}{style}"
        )


@dataclass(frozen=True, eq=False)
class SplitGroup:
    """Linears that tensor parallelism splits along one shared dimension (formats.md §10.1).

    `columns` produce the dimension (their out_features are split), `rows` consume it (their
    in_features are split); each member says how many features one unit is (head_dim for heads,
    1 for channels). Fused projections are listed per member, so each is split on its own.
    """

    role: SplitRole
    name: str  # for messages, e.g. "model.layers.0.mlp"
    units: int
    columns: tuple[tuple[QuantLinear, int], ...]
    rows: tuple[tuple[QuantLinear, int], ...] = ()
    query_heads: int = 0  # kv_heads: the query heads that share them (replication rule)
    cached: bool = False  # the KV cache stores one entry per unit of this group


class TensorParallelLayer:
    """Mixin of layers that own a split dimension or need the parallel state at run time."""

    def split_groups(self) -> list[SplitGroup]:
        return []

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        """Adopt this rank's share: `partitions` maps each of `split_groups()`' roles to its split."""


class MergedLinear(QuantLinear):
    """Column projections of the same input (q/k/v, gate/up) computed by one kernel call.

    Built by the loader from this rank's shards of the members once their weights are
    concatenated along out_features (`anyquant.quant.merge`); `parts` are the members' local
    output sizes, in order. The members stay in the model (tensor-parallel splitting and the
    checkpoint names refer to them) but hold no weight."""

    def __init__(self, prefix: str, members: tuple[QuantLinear, ...]) -> None:
        first = members[0]
        has_bias = any(m.bias is not None for m in members)
        super().__init__(
            prefix, first.in_features, sum(m.out_features for m in members), has_bias, style="column"
        )
        self.parts = tuple(m.out_features for m in members)
        self.members = tuple(m.prefix for m in members)

    def forward_parts(self, x: Tensor) -> tuple[Tensor, ...]:
        """The members' outputs, as views of the one merged output."""
        return self(x).split(self.parts, dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={list(self.parts)}"


@dataclass(frozen=True, eq=False)
class ProjectionGroup:
    """Projections of one input that the loader may merge into `MergedLinear` `attr` of `owner`."""

    owner: MergeableProjections
    attr: str  # e.g. "qkv_proj"
    members: tuple[QuantLinear, ...]

    @property
    def prefix(self) -> str:
        """The merged layer's name: the members' module path with `attr` as the last part."""
        return f"{self.members[0].prefix.rsplit('.', 1)[0]}.{self.attr}"


class MergeableProjections:
    """Mixin of layers whose forward runs a merged projection when the loader installs one."""

    def projection_groups(self) -> list[ProjectionGroup]:
        return []

    def adopt_merged(self, group: ProjectionGroup, merged: MergedLinear) -> None:
        setattr(self, group.attr, merged)
