"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention, sparse MoE with a gated shared expert.

Also owns the Qwen MoE layer rule shared with Qwen3-MoE: a layer is sparse unless it is listed in
`mlp_only_layers` or missed by `decoder_sparse_step`; dense layers use `intermediate_size`, experts
`moe_intermediate_size`. Config defaults follow transformers' Qwen2MoeConfig / Qwen3MoeConfig.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anyquant.config_fields import cfg_bool, cfg_int, cfg_int_list
from anyquant.errors import CheckpointError
from anyquant.layers.moe import RoutingConfig, SparseMoE
from anyquant.models.base import DecoderArgs, DecoderLM, MlpFactory, dense_mlp


def _int_field(config: dict[str, Any], keys: tuple[str, ...], default: int) -> int:
    """The first of `keys` present (transformers 5 saves Qwen3-MoE's num_experts as num_local_experts)."""
    for key in keys:
        if config.get(key) is not None:
            return cfg_int(config, key, minimum=0)
    return default


def qwen_moe_mlp(
    config: dict[str, Any], default_experts: int, default_top_k: int, default_moe_size: int, shared: bool
) -> MlpFactory:
    """The `make_mlp` hook of the Qwen MoE families."""
    num_experts = _int_field(config, ("num_experts", "num_local_experts"), default_experts)
    top_k = _int_field(config, ("num_experts_per_tok",), default_top_k)
    moe_size = _int_field(config, ("moe_intermediate_size",), default_moe_size)
    shared_size = _int_field(config, ("shared_expert_intermediate_size",), 5632) if shared else 0
    step = _int_field(config, ("decoder_sparse_step",), 1)
    if step <= 0:
        raise CheckpointError(
            f"config.json: field 'decoder_sparse_step' = {step}; expected a positive number"
        )
    dense_only = set(cfg_int_list(config, "mlp_only_layers"))
    norm = cfg_bool(config, "norm_topk_prob", False)
    routing = RoutingConfig(num_experts, top_k, norm_topk_prob=norm) if num_experts > 0 else None

    def make_mlp(args: DecoderArgs, index: int, prefix: str) -> nn.Module:
        if routing is None or index in dense_only or (index + 1) % step:
            return dense_mlp(args, index, prefix)
        return SparseMoE(
            prefix,
            args.hidden_size,
            moe_size,
            routing,
            args.hidden_act,
            shared_name="shared_expert" if shared else None,
            shared_size=shared_size,
            shared_gate=shared,
        )

    return make_mlp


def build(config: dict[str, Any]) -> DecoderLM:
    # Qwen2-MoE always has q/k/v biases (transformers 5 writes them as `qkv_bias`), never an o bias.
    qkv_bias = cfg_bool(config, "qkv_bias", True)
    args = DecoderArgs.from_hf(config, qkv_bias=qkv_bias, o_bias=False)
    return DecoderLM(args, make_mlp=qwen_moe_mlp(config, 60, 4, 1408, shared=True))
