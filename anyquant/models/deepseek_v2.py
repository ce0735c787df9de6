"""DeepSeek-V2 and DeepSeek-V3: latent attention (MLA) with a dense-then-MoE MLP stack.

Owns reading the family's config.json (MLA widths, which layers are sparse, the two routing
variants) and wiring `MLAttention` / `SparseMoE` into `DecoderLM`. V2 routes by softmax, greedy or
group-limited (best expert per group); V3 by sigmoid with `e_score_correction_bias` for selection
and groups ranked by their two best experts. V3's multi-token-prediction block is not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from anyquant.config_fields import cfg_bool, cfg_float, cfg_int, cfg_str
from anyquant.errors import CheckpointError, UnsupportedError
from anyquant.layers.mla import MLADims, MLAttention, mla_softmax_scale
from anyquant.layers.moe import RoutingConfig, SparseMoE
from anyquant.layers.rotary import RotaryEmbedding
from anyquant.models.base import CacheShape, DecoderArgs, DecoderLM, dense_mlp


@dataclass(frozen=True)
class DeepseekArgs:
    """What the DeepSeek family reads beyond the common decoder fields."""

    mla: MLADims
    rope_interleave: bool  # rotary pairs are adjacent channels (2i, 2i+1)
    attention_bias: bool
    routing: RoutingConfig | None  # None: every layer dense
    moe_intermediate_size: int
    shared_size: int  # moe_intermediate_size * n_shared_experts; 0: no shared experts
    first_k_dense_replace: int
    moe_layer_freq: int
    num_mtp_layers: int  # V3 multi-token-prediction blocks stored after the last layer

    def is_sparse(self, index: int) -> bool:
        return (
            self.routing is not None
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )


# Defaults of fields a config.json may omit, as transformers' DeepseekV2Config / V3Config set them.
_DEFAULTS: dict[bool, dict[str, Any]] = {
    False: {"first_k_dense_replace": 0, "n_shared_experts": 2, "routed_scaling_factor": 1.0},
    True: {
        "first_k_dense_replace": 3,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 1,
    },
}


def _int(config: dict[str, Any], key: str, default: int) -> int:
    return cfg_int(config, key, default, minimum=0)


def _v2_routing(config: dict[str, Any], num_experts: int, top_k: int, scaling: float) -> RoutingConfig:
    scoring = cfg_str(config, "scoring_func", "softmax")
    if scoring != "softmax":
        raise UnsupportedError(
            f"config.json: DeepseekV2 scoring_func={scoring!r}; only 'softmax' exists in V2"
        )
    if cfg_bool(config, "norm_topk_prob", False) and top_k > 1:
        # DeepSeek's own V2 code renormalises *instead of* scaling, transformers ignores the flag,
        # vLLM does both; no released V2 checkpoint sets it, so refuse rather than guess.
        raise UnsupportedError(
            "config.json: DeepseekV2 with norm_topk_prob=true is ambiguous across reference "
            "implementations; only norm_topk_prob=false is supported for V2"
        )
    method = cfg_str(config, "topk_method", "greedy")
    if method == "greedy":
        return RoutingConfig(num_experts, top_k, routed_scaling_factor=scaling)
    if method == "group_limited_greedy":
        return RoutingConfig(
            num_experts,
            top_k,
            n_group=_int(config, "n_group", 1),
            topk_group=_int(config, "topk_group", 1),
            routed_scaling_factor=scaling,
            group_score="max",
        )
    raise UnsupportedError(
        f"config.json: DeepseekV2 topk_method={method!r}; supported: greedy, group_limited_greedy"
    )


def _v3_routing(config: dict[str, Any], num_experts: int, top_k: int, scaling: float) -> RoutingConfig:
    scoring = cfg_str(config, "scoring_func", "sigmoid")
    method = cfg_str(config, "topk_method", "noaux_tc")
    if scoring != "sigmoid" or method != "noaux_tc":
        raise UnsupportedError(
            f"config.json: DeepseekV3 scoring_func={scoring!r}, topk_method={method!r}; "
            "only sigmoid scoring with noaux_tc (bias-corrected grouped top-k) is supported"
        )
    return RoutingConfig(
        num_experts,
        top_k,
        scoring="sigmoid",
        norm_topk_prob=cfg_bool(config, "norm_topk_prob", False),
        n_group=_int(config, "n_group", 1),
        topk_group=_int(config, "topk_group", 1),
        e_score_correction_bias=True,
        routed_scaling_factor=scaling,
        group_score="top2_sum",
    )


def read_args(config: dict[str, Any], v3: bool) -> DeepseekArgs:
    config = {**_DEFAULTS[v3], **{k: v for k, v in config.items() if v is not None or k == "q_lora_rank"}}
    if "q_lora_rank" not in config:
        raise CheckpointError("config.json: field 'q_lora_rank' is required (null for a full-rank q_proj)")
    mla = MLADims(
        num_heads=cfg_int(config, "num_attention_heads"),
        q_lora_rank=None if config["q_lora_rank"] is None else cfg_int(config, "q_lora_rank"),
        kv_lora_rank=cfg_int(config, "kv_lora_rank"),
        qk_nope_head_dim=cfg_int(config, "qk_nope_head_dim", minimum=0),
        qk_rope_head_dim=cfg_int(config, "qk_rope_head_dim"),
        v_head_dim=cfg_int(config, "v_head_dim"),
    )
    first_dense = _int(config, "first_k_dense_replace", 0)
    freq = _int(config, "moe_layer_freq", 1)
    if freq <= 0:
        raise CheckpointError(f"config.json: field 'moe_layer_freq' = {freq}; expected a positive number")
    num_layers = cfg_int(config, "num_hidden_layers")
    any_sparse = any(i >= first_dense and i % freq == 0 for i in range(num_layers))
    num_experts = _int(config, "n_routed_experts", 0)  # absent or 0: a dense model
    routing = None
    if num_experts > 0 and any_sparse:  # routing fields of an all-dense config are never used
        top_k = cfg_int(config, "num_experts_per_tok")
        scaling = cfg_float(config, "routed_scaling_factor", positive=True)
        routing = (_v3_routing if v3 else _v2_routing)(config, num_experts, top_k, scaling)
    moe_size = _int(config, "moe_intermediate_size", 0)
    if routing is not None and moe_size <= 0:
        raise CheckpointError("config.json: field 'moe_intermediate_size' is required with n_routed_experts")
    return DeepseekArgs(
        mla=mla,
        # V2 always pairs adjacent channels; V3 makes it a flag (true in released checkpoints).
        rope_interleave=cfg_bool(config, "rope_interleave", True) if v3 else True,
        attention_bias=cfg_bool(config, "attention_bias", False),
        routing=routing,
        moe_intermediate_size=moe_size,
        shared_size=moe_size * _int(config, "n_shared_experts", 0),
        first_k_dense_replace=first_dense,
        moe_layer_freq=freq,
        num_mtp_layers=_int(config, "num_nextn_predict_layers", 0) if v3 else 0,
    )


class DeepseekLM(DecoderLM):
    """`DecoderLM` with MLA and the DeepSeek MoE rule; ignores V3's stored MTP blocks."""

    def __init__(self, args: DecoderArgs, ds: DeepseekArgs) -> None:
        if args.mlp_bias and ds.routing is not None:
            raise UnsupportedError("config.json: mlp_bias=true with MoE layers (experts have no bias)")
        rotary = RotaryEmbedding(ds.mla.qk_rope_head_dim, args.rope, args.max_position, ds.rope_interleave)
        scale = mla_softmax_scale(ds.mla.qk_head_dim, args.rope)

        def make_attention(a: DecoderArgs, index: int, prefix: str, rot: RotaryEmbedding) -> nn.Module:
            return MLAttention(prefix, index, a.hidden_size, ds.mla, rot, scale, ds.attention_bias)

        def make_mlp(a: DecoderArgs, index: int, prefix: str) -> nn.Module:
            if ds.routing is None or not ds.is_sparse(index):
                return dense_mlp(a, index, prefix)
            return SparseMoE(
                prefix,
                a.hidden_size,
                ds.moe_intermediate_size,
                ds.routing,
                a.hidden_act,
                shared_name="shared_experts" if ds.shared_size > 0 else None,
                shared_size=ds.shared_size,
            )

        m = ds.mla
        # The latent cache (layers/mla.py): one "KV head" of key [latent, rope key], whose first
        # kv_lora_rank values are the value (stored once).
        cache = CacheShape(1, m.cache_key_dim, m.kv_lora_rank, value_in_key=True)
        super().__init__(args, make_mlp, make_attention, rotary, cache)
        self.deepseek = ds
        # V3 checkpoints append the MTP block(s) as extra layers; they only serve speculative decoding.
        self.ignorable_prefixes: tuple[str, ...] = tuple(
            f"model.layers.{args.num_layers + i}." for i in range(ds.num_mtp_layers)
        )


def _build(config: dict[str, Any], v3: bool) -> DeepseekLM:
    ds = read_args(config, v3)
    args = DecoderArgs.from_hf(
        config,
        # Unused by MLA (its cache is the latent, see DeepseekLM); num_key_value_heads plays no part.
        num_kv_heads=ds.mla.num_heads,
        head_dim=ds.mla.qk_head_dim,
        qkv_bias=ds.attention_bias,
        o_bias=ds.attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)) and not v3,
    )
    return DeepseekLM(args, ds)


def build(config: dict[str, Any]) -> DeepseekLM:
    """DeepseekV2ForCausalLM (DeepSeek-V2, V2-Lite, V2.5, Coder-V2)."""
    return _build(config, v3=False)


def build_v3(config: dict[str, Any]) -> DeepseekLM:
    """DeepseekV3ForCausalLM (DeepSeek-V3, R1, Kimi/Moonlight-style configs)."""
    return _build(config, v3=True)
