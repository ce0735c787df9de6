"""Mixtral: Llama attention with a sparse MoE MLP in every layer.

Routing: softmax over `num_local_experts`, top `num_experts_per_tok`, selected weights always
renormalised to sum 1. Two on-disk layouts exist and both load: the original
`block_sparse_moe.{gate, experts.{e}.w1 (gate) / w3 (up) / w2 (down)}`, and transformers 5's
`mlp.{gate, experts.{e}.gate_proj / up_proj / down_proj}` (what GPT-QModel 7 saves).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

from anyquant.config_fields import cfg_int
from anyquant.layers.moe import EXPERT_NAMES, MIXTRAL_EXPERT_NAMES, RoutingConfig, SparseMoE
from anyquant.models.base import DecoderArgs, DecoderLM


def routing_config(config: dict[str, Any]) -> RoutingConfig:
    # Defaults are transformers' MixtralConfig defaults (Mixtral-8x7B).
    return RoutingConfig(
        num_experts=cfg_int(config, "num_local_experts", 8),
        top_k=cfg_int(config, "num_experts_per_tok", 2),
        norm_topk_prob=True,
    )


def uses_transformers5_names(tensor_names: Collection[str]) -> bool:
    """True when the checkpoint stores experts as `mlp.experts.{e}.gate_proj` (no `block_sparse_moe`)."""
    return not any(".block_sparse_moe." in n for n in tensor_names) and any(
        ".mlp.experts." in n for n in tensor_names
    )


def build(config: dict[str, Any], tensor_names: Collection[str] = ()) -> DecoderLM:
    args = DecoderArgs.from_hf(config)
    routing = routing_config(config)
    modern = uses_transformers5_names(tensor_names)

    def make_mlp(args: DecoderArgs, index: int, prefix: str) -> nn.Module:
        if modern:
            return SparseMoE(
                prefix, args.hidden_size, args.intermediate_size, routing, args.hidden_act, EXPERT_NAMES
            )
        # The decoder names the slot `.mlp`; original Mixtral checkpoints store it as `.block_sparse_moe`.
        block = prefix.removesuffix(".mlp") + ".block_sparse_moe"
        return SparseMoE(
            block, args.hidden_size, args.intermediate_size, routing, args.hidden_act, MIXTRAL_EXPERT_NAMES
        )

    return DecoderLM(args, make_mlp=make_mlp)
