"""Mixture-of-Experts MLP: the router, the routing rules, per-expert MLPs and the sparse block.

Owns `RoutingConfig` (every routing rule of the supported families: softmax / sigmoid scores,
top-k renormalisation, DeepSeek grouped top-k and score-correction bias, routed scaling), `route`
(logits -> top-k ids and weights, in fp32), `Router` (the gate, a fp32 QuantLinear) and `SparseMoE`.
Each expert is its own small gated MLP of QuantLinears at the checkpoint's per-expert prefixes,
so every format and every linear kernel applies to experts unchanged.

Under tensor parallelism every rank holds a slice of every expert; with expert parallelism
(`hold_experts`) a rank holds whole experts, a contiguous range of them, instead. Either way every
rank routes every token (the router is replicated and its input is the same on all ranks), computes
what its weights allow and the block's output is one sum over ranks: the same single collective.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import Tensor, nn

from anyquant.errors import CheckpointError
from anyquant.layers.custom_ops import opaque_call
from anyquant.layers.linear import QuantLinear, TensorParallelLayer
from anyquant.layers.mlp import PROJ_NAMES, GatedMLP
from anyquant.parallel.comm import all_reduce, all_reduce_max
from anyquant.quant.spec import ROUTER_DTYPE

if TYPE_CHECKING:
    from anyquant.parallel.partition import ExpertPlacement, Partition
    from anyquant.parallel.state import ParallelState
    from anyquant.quant.kernels.avx512_moe import FusedExperts
    from anyquant.quant.kernels.avx512_moe_vnni import FusedInt8Experts
    from anyquant.quant.kernels.base import LinearKernel

Scoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]

# Checkpoint names of one expert's projections: (gate, up, down).
EXPERT_NAMES = PROJ_NAMES
MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")


def _config_error(field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"config.json: field {field!r} {problem}")


@dataclass(frozen=True)
class RoutingConfig:
    """How a token picks its experts and how their outputs are weighted.

    scores = softmax(logits) or sigmoid(logits). Selection ranks `scores + bias` when the router
    carries `e_score_correction_bias`, else `scores`; with `n_group > 1` only experts of the
    `topk_group` best groups compete. Weights are the *unbiased* scores of the selected experts,
    renormalised to sum 1 when `norm_topk_prob`, then multiplied by `routed_scaling_factor`.
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    e_score_correction_bias: bool = False  # the router has a [E] bias used for selection only
    routed_scaling_factor: float = 1.0
    # Group score: DeepSeek-V2 takes the best expert of each group, V3 (the variant with the
    # correction bias) the sum of the two best; None picks by that rule.
    group_score: GroupScore | None = None

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise _config_error("num_experts", f"= {self.num_experts}; expected a positive number")
        if not 0 < self.top_k <= self.num_experts:
            raise _config_error(
                "num_experts_per_tok", f"= {self.top_k}; expected 1..num_experts ({self.num_experts})"
            )
        if self.scoring not in ("softmax", "sigmoid"):
            raise _config_error("scoring_func", f"= {self.scoring!r}; expected 'softmax' or 'sigmoid'")
        if self.n_group <= 0 or self.num_experts % self.n_group:
            raise _config_error(
                "n_group",
                f"= {self.n_group}; expected a positive divisor of num_experts ({self.num_experts})",
            )
        if not 0 < self.topk_group <= self.n_group:
            raise _config_error("topk_group", f"= {self.topk_group}; expected 1..n_group ({self.n_group})")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise _config_error(
                "num_experts_per_tok",
                f"= {self.top_k} exceeds the {self.topk_group} groups x "
                f"{self.num_experts // self.n_group} experts that stay eligible",
            )
        if (
            self.resolved_group_score == "top2_sum"
            and self.n_group > 1
            and self.num_experts // self.n_group < 2
        ):
            raise _config_error("n_group", f"= {self.n_group}: top-2 group scores need 2+ experts per group")

    @property
    def resolved_group_score(self) -> GroupScore:
        if self.group_score is not None:
            return self.group_score
        return "top2_sum" if self.e_score_correction_bias else "max"


def _group_mask(choice: Tensor, cfg: RoutingConfig) -> Tensor:
    """[T, E] bool: experts inside the `topk_group` best groups of each token."""
    t = choice.shape[0]
    grouped = choice.view(t, cfg.n_group, cfg.num_experts // cfg.n_group)
    if cfg.resolved_group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    best = group_scores.topk(cfg.topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return mask.unsqueeze(-1).expand_as(grouped).reshape(t, cfg.num_experts)


def route(logits: Tensor, cfg: RoutingConfig, correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Router logits [T, E] -> (weights [T, K] fp32, expert ids [T, K] int64)."""
    logits = logits.float()
    scores = logits.softmax(dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.n_group > 1:
        choice = choice.masked_fill(~_group_mask(choice, cfg), float("-inf"))
    ids = choice.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        # The epsilon (DeepSeek-V3's) only matters for scores that underflow to zero; next to any
        # real sum it is below one ulp, so softmax families are unaffected.
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids


class Router(QuantLinear):
    """The MoE gate: hidden -> one logit per expert, always computed in fp32.

    With `cfg.e_score_correction_bias`, it also holds DeepSeek-V3's `e_score_correction_bias` [E] (loaded by
    name in fp32 like the weight); the bias steers selection only, never the weights."""

    def __init__(self, prefix: str, hidden_size: int, cfg: RoutingConfig) -> None:
        super().__init__(prefix, hidden_size, cfg.num_experts, bias=False, kind="router")
        self.cfg = cfg
        bias = torch.zeros(cfg.num_experts) if cfg.e_score_correction_bias else None
        # An extra parameter of a QuantLinear subclass: the loader reads it by its module path.
        self.e_score_correction_bias: nn.Parameter | None
        self.register_parameter(
            "e_score_correction_bias", None if bias is None else nn.Parameter(bias, requires_grad=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] -> fp32 logits [T, E]."""
        return super().forward(x.to(ROUTER_DTYPE)).to(ROUTER_DTYPE)

    def select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (weights [T, K] fp32, ids [T, K])."""
        return route(self(x), self.cfg, self.e_score_correction_bias)


def expert_mlp(
    prefix: str, hidden_size: int, intermediate_size: int, act: str, names: tuple[str, str, str]
) -> GatedMLP:
    """One routed expert: a gated MLP whose projections are of kind "experts".

    Under tensor parallelism every rank holds a slice of every expert's intermediate dimension
    (formats.md §10.1); `SparseMoE` sums the ranks' outputs once for all experts."""
    return GatedMLP(
        prefix, hidden_size, intermediate_size, act, reduce_output=False, kind="experts", names=names
    )


class SparseMoE(nn.Module, TensorParallelLayer):
    """Router -> top-k experts per token -> weighted sum (+ shared experts), returned in fp32.

    prefix: the checkpoint module of the block (`model.layers.3.mlp`, Mixtral's
    `...block_sparse_moe`); the router is `{prefix}.gate`, experts `{prefix}.experts.{e}.*`.
    shared_name / shared_size: an always-on gated MLP (Qwen2-MoE `shared_expert`, DeepSeek
    `shared_experts`); shared_gate: Qwen2-MoE's `shared_expert_gate`, a H->1 fp32 linear whose
    sigmoid scales the shared output.
    """

    def __init__(
        self,
        prefix: str,
        hidden_size: int,
        moe_intermediate_size: int,
        routing: RoutingConfig,
        act: str = "silu",
        expert_names: tuple[str, str, str] = EXPERT_NAMES,
        shared_name: str | None = None,
        shared_size: int = 0,
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        if moe_intermediate_size <= 0:
            raise _config_error(
                "moe_intermediate_size", f"= {moe_intermediate_size}; expected a positive size"
            )
        self.prefix = prefix
        self.routing = routing
        self.act_name = act
        # Global ids of the routed experts this rank holds (`self.experts[i]` is expert
        # `local_experts[i]`): all of them unless expert parallelism gave it a range.
        self.local_experts = range(routing.num_experts)
        # Set by `finish_loading`: all routed experts as one fused call, or why not.
        self.fused: FusedExperts | FusedInt8Experts | None = None
        self.fused_reason: str | None = "not loaded"
        self.gate = Router(f"{prefix}.gate", hidden_size, routing)
        self.experts = nn.ModuleList(
            expert_mlp(f"{prefix}.experts.{e}", hidden_size, moe_intermediate_size, act, expert_names)
            for e in range(routing.num_experts)
        )
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: QuantLinear | None = None
        self.parallel: ParallelState | None = None
        self.opaque_handle: int | None = None  # see `QuantLinear.opaque_handle`
        if shared_name is not None and shared_size > 0:
            self.shared_expert = GatedMLP(
                f"{prefix}.{shared_name}", hidden_size, shared_size, act, reduce_output=False
            )
            if shared_gate:
                self.shared_expert_gate = QuantLinear(
                    f"{prefix}.shared_expert_gate", hidden_size, 1, kind="router"
                )

    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] in the compute dtype -> fp32 [T, H]."""
        weights, ids = self.gate.select(x)
        out = self._routed(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x).float()
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x.to(ROUTER_DTYPE)).float())
            out = out + shared
        if self.parallel is not None:
            # Routed and shared experts' row-parallel partial sums, reduced once for the block.
            out = all_reduce(out, self.parallel)
        return out

    def set_parallel(self, partitions: Mapping[str, Partition], state: ParallelState) -> None:
        self.parallel = state if state.is_parallel else None

    def hold_experts(self, placement: ExpertPlacement, rank: int) -> None:
        """Expert parallelism: keep only this rank's whole experts (before loading: the others are
        never read). Tokens routed elsewhere contribute zero here; the block's sum over ranks adds
        the owners' outputs."""
        held = placement.experts(rank)
        self.experts = nn.ModuleList(self.experts[e] for e in held)
        self.local_experts = held

    def _local_ids(self, ids: Tensor) -> Tensor:
        """Global expert ids -> this rank's expert index, -1 for experts held by another rank
        (no host sync: a compiled decode step keeps the whole block)."""
        held = self.local_experts
        if len(held) == self.routing.num_experts:
            return ids
        local = ids - held.start
        return torch.where((local >= 0) & (local < len(held)), local, -1)

    def finish_loading(self) -> None:
        """Once every expert's kernel is loaded: fuse the routed experts into one call per layer
        when their kernels allow it (`fused_reason` says why not otherwise)."""
        kernels: list[tuple[LinearKernel | None, ...]] = [
            (e.gate_proj.kernel, e.up_proj.kernel, e.down_proj.kernel) for e in self._expert_mlps()
        ]
        if any(
            p.bias is not None for e in self._expert_mlps() for p in (e.gate_proj, e.up_proj, e.down_proj)
        ):
            self.fused_reason = "experts have biases"
            return
        if any(e.down_proj.global_act for e in self._expert_mlps()):
            # The call quantizes h from the rank's own slice; the scale must span every rank's.
            self.fused_reason = "row-parallel experts take dynamic activation scales over all ranks"
            return
        from anyquant.quant.kernels import avx512_moe  # the C++ kernels' module: only when loading

        twins = avx512_moe.weight_only_twins(kernels)
        if twins is not None and avx512_moe.cannot_fuse(twins, self.act_name) is None:
            # W8A8 int8 experts: the AVX-512 kernels over the same codes replace the int8 GEMM ones
            # (one copy of the weights), so that the layer runs as one call.
            for expert, (gate, up, down) in zip(self._expert_mlps(), twins):
                for layer, kernel in (
                    (expert.gate_proj, gate),
                    (expert.up_proj, up),
                    (expert.down_proj, down),
                ):
                    assert kernel is not None
                    layer.set_kernel(kernel)
            kernels = twins
        self.fused, self.fused_reason = avx512_moe.fuse(kernels, self.act_name)

    def _expert_mlps(self) -> list[GatedMLP]:
        return [cast(GatedMLP, e) for e in self.experts]

    def _routed(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        ids = self._local_ids(ids)
        if self.fused is not None:
            return self.fused(x, weights, ids)
        if self.opaque_handle is not None and torch.compiler.is_compiling():
            # Grouping tokens by expert needs the counts on the host: one opaque op in a graph.
            return opaque_call(self.opaque_handle, x, weights, ids)
        return self._routed_per_expert(x, weights, ids)

    def _routed_per_expert(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Sort the (token, slot) pairs by expert so each selected expert runs once on its tokens.
        `ids` are local expert indices, -1 for experts another rank holds (sorted last, skipped)."""
        t, k = ids.shape
        n = len(self.experts)
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
        flat = torch.where(ids >= 0, ids, n).reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = order // k
        slot_weights = weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=n + 1)[:n].tolist()
        picked: list[tuple[GatedMLP, Tensor, Tensor]] = []  # (expert, its tokens, their weights)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                picked.append(
                    (cast(GatedMLP, expert), tokens[start : start + n], slot_weights[start : start + n])
                )
                start += n
        for (_, rows, w), y in zip(picked, self._expert_outputs(x, picked)):
            out.index_add_(0, rows, y.float() * w[:, None])
        return out

    def _expert_outputs(self, x: Tensor, picked: list[tuple[GatedMLP, Tensor, Tensor]]) -> Iterator[Tensor]:
        """Each picked expert's output on its tokens, one expert at a time.

        Row-parallel down projections with dynamic per-token activation scales need the amax over
        all ranks: rather than one all-reduce per expert, all hidden states are computed first
        and every expert's amax is max-reduced in one collective for the block."""
        if self.parallel is None or not any(e.down_proj.global_act for e, _, _ in picked):
            for expert, rows, _ in picked:
                yield expert(x[rows])
            return
        hidden = [expert.hidden(x[rows]) for expert, rows, _ in picked]
        local = [e.down_proj.local_act_amax(h) for (e, _, _), h in zip(picked, hidden)]
        reduced = all_reduce_max(torch.cat([a.reshape(-1) for a in local if a is not None]), self.parallel)
        offset = 0
        for (expert, _, _), h, a in zip(picked, hidden, local):
            if a is None:
                yield expert.down_proj(h)
                continue
            yield expert.down_proj.forward_with_amax(h, reduced[offset : offset + a.numel()].view(a.shape))
            offset += a.numel()
