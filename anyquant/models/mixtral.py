"""Mixtral: Llama attention with a sparse MoE MLP in every layer (`block_sparse_moe` on disk).

Routing: softmax over `num_local_experts`, top `num_experts_per_tok`, selected weights always
renormalised to sum 1. Experts are `block_sparse_moe.experts.{e}.w1` (gate), `.w3` (up), `.w2` (down).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anyquant.layers.moe import MIXTRAL_EXPERT_NAMES, RoutingConfig, SparseMoE
from anyquant.models.base import DecoderArgs, DecoderLM


def routing_config(config: dict[str, Any]) -> RoutingConfig:
    # Defaults are transformers' MixtralConfig defaults (Mixtral-8x7B).
    return RoutingConfig(
        num_experts=int(config.get("num_local_experts") or 8),
        top_k=int(config.get("num_experts_per_tok") or 2),
        norm_topk_prob=True,
    )


def build(config: dict[str, Any]) -> DecoderLM:
    args = DecoderArgs.from_hf(config)
    routing = routing_config(config)

    def make_mlp(args: DecoderArgs, index: int, prefix: str) -> nn.Module:
        # The decoder names the slot `.mlp`; Mixtral checkpoints store it as `.block_sparse_moe`.
        block = prefix.removesuffix(".mlp") + ".block_sparse_moe"
        return SparseMoE(
            block, args.hidden_size, args.intermediate_size, routing, args.hidden_act, MIXTRAL_EXPERT_NAMES
        )

    return DecoderLM(args, make_mlp=make_mlp)
