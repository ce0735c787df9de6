"""DeepSeek-V2 / V3 GGUF files (`general.architecture = deepseek2`) in transformers' terms.

Owns the config.json a deepseek2 file implies (latent attention widths, leading dense layers, the
routed and shared experts, the router: softmax -> DeepseekV2, sigmoid with a selection bias ->
DeepseekV3; YaRN with DeepSeek's mscale), the MLA tensor names, and joining the two halves
llama.cpp's converter splits kv_b_proj into (attn_k_b holds W_UK transposed per head, attn_v_b
holds W_UV) back into the kv_b_proj the model's latent attention absorbs. Files written before
that split (one attn_kv_b, no `key_length_mla`) read as they are.

Where llama.cpp departs from the transformers model the file was converted from, the model wins:
DeepSeek-V2's group-limited routing ranks groups by their best expert (llama.cpp ranks every
file's groups by the sum of their two best, DeepSeek-V3's rule), and the two latent RMSNorms use
1e-6 (llama.cpp uses the file's rms epsilon; the same value in every released DeepSeek model).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import CheckpointError, UnsupportedError
from anyquant.loading.gguf_file import GgufFile
from anyquant.loading.gguf_layout import (
    EXPERT_NAMES,
    LAYER_NAMES,
    LINEAR_ROLES,
    GgufLayout,
    MappedTensor,
    auto_dtype,
    float_key,
    map_tensors,
    optional_key,
    require_key,
    rope_config,
    special_token_config,
)

ARCH = "deepseek2"
# blk.{i}.<gguf> -> model.layers.{i}.<transformers>, beyond the shared table (which also maps
# attn_q, attn_output, the dense ffn_* of leading layers and the router ffn_gate_inp).
_MLA_NAMES = {
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",  # files converted before llama.cpp split it
    "attn_k_b": "self_attn.k_b_proj",  # joined with attn_v_b into kv_b_proj (_join_kv_b)
    "attn_v_b": "self_attn.v_b_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    "exp_probs_b": "mlp.gate.e_score_correction",  # DeepSeek-V3's selection bias (renamed below)
}
_DEEPSEEK_LINEAR = frozenset(
    (*LINEAR_ROLES, "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b", *EXPERT_NAMES)
)
_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE


def deepseek_layout(file: GgufFile) -> GgufLayout:
    layers = require_key(file, f"{ARCH}.block_count", int)
    tensors = map_tensors(file, ARCH, {**LAYER_NAMES, **_MLA_NAMES}, _DEEPSEEK_LINEAR, num_layers=layers)
    for i in range(layers):
        _join_kv_b(file, tensors, f"model.layers.{i}")
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"{file.path}: tensor 'token_embd.weight' is missing")
    config = {
        **_attention(file, tensors),
        **_moe(file),
        "hidden_size": require_key(file, f"{ARCH}.embedding_length", int),
        "intermediate_size": optional_key(file, f"{ARCH}.feed_forward_length", int, 0),
        "num_hidden_layers": layers,
        "vocab_size": embed.gguf.shape[0],
        "max_position_embeddings": optional_key(file, f"{ARCH}.context_length", int, 2048),
        "rms_norm_eps": float_key(file, f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6),
        "tie_word_embeddings": False,  # a missing output.weight is aliased to the embedding
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": auto_dtype({t.gguf.ggml_type for t in tensors.values() if t.linear}),
        **special_token_config(file),
    }
    return GgufLayout(config, tensors)


def _attention(file: GgufFile, tensors: dict[str, MappedTensor]) -> dict[str, Any]:
    heads = require_key(file, f"{ARCH}.attention.head_count", int)
    rope = require_key(file, f"{ARCH}.rope.dimension_count", int)
    split = any(m.join is not None for m in tensors.values())
    if file.get(f"{ARCH}.attention.key_length_mla") is not None:
        key = require_key(file, f"{ARCH}.attention.key_length_mla", int)
        value = require_key(file, f"{ARCH}.attention.value_length_mla", int)
    else:  # written before the kv_b split: key/value lengths are the expanded per-head widths
        if split:
            raise CheckpointError(
                f"{file.path}: attn_k_b / attn_v_b tensors but no {ARCH}.attention.key_length_mla"
            )
        key = require_key(file, f"{ARCH}.attention.key_length", int)
        value = require_key(file, f"{ARCH}.attention.value_length", int)
    if key <= rope:
        raise CheckpointError(
            f"{file.path}: key length {key} leaves no room beside {ARCH}.rope.dimension_count = {rope}"
        )
    # llama.cpp reads a missing q_lora_rank as 0 (a full-rank attn_q, as in DeepSeek-V2-Lite).
    q_lora = optional_key(file, f"{ARCH}.attention.q_lora_rank", int, 0)
    has_q_a = "model.layers.0.self_attn.q_a_proj.weight" in tensors
    if has_q_a != (q_lora > 0):
        raise CheckpointError(
            f"{file.path}: {ARCH}.attention.q_lora_rank = {q_lora} but attn_q_a tensors are "
            f"{'present' if has_q_a else 'missing'}"
        )
    theta = float_key(file, f"{ARCH}.rope.freq_base", 10000.0)
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": require_key(file, f"{ARCH}.attention.kv_lora_rank", int),
        "qk_nope_head_dim": key - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": value,
        "rope_theta": theta,
        **_yarn_mscale(file, rope_config(file, ARCH, rope, theta)),
    }


def _yarn_mscale(file: GgufFile, rope: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's YaRN also scales the softmax by mscale_all_dim, which llama.cpp's converter
    stores as `yarn_log_multiplier` = 0.1 * mscale_all_dim; llama.cpp then takes mscale equal to
    it (true of every released DeepSeek config), so the cos/sin factor is 1."""
    scaling = rope.get("rope_scaling")
    key = f"{ARCH}.rope.scaling.yarn_log_multiplier"
    if scaling is None or file.get(key) is None:
        return rope
    if scaling["rope_type"] != "yarn":
        raise UnsupportedError(f"{file.path}: {key} with rope scaling {scaling['rope_type']!r}")
    mscale = float(f"{float_key(file, key, 0.0) / 0.1:.6g}")
    return {"rope_scaling": {**scaling, "mscale": mscale, "mscale_all_dim": mscale}}


def _moe(file: GgufFile) -> dict[str, Any]:
    experts = optional_key(file, f"{ARCH}.expert_count", int, 0)
    dense = optional_key(file, f"{ARCH}.leading_dense_block_count", int, 0)
    config: dict[str, Any] = {"first_k_dense_replace": dense, "moe_layer_freq": 1}
    if experts == 0:
        return {**config, "n_routed_experts": None}
    gating = optional_key(file, f"{ARCH}.expert_gating_func", int, 1)  # absent: V2's softmax
    if gating not in _GATING:
        raise UnsupportedError(
            f"{file.path}: {ARCH}.expert_gating_func = {gating}; supported: 1 (softmax), 2 (sigmoid)"
        )
    groups = optional_key(file, f"{ARCH}.expert_group_count", int, 1)
    used_groups = optional_key(file, f"{ARCH}.expert_group_used_count", int, groups)
    norm = optional_key(file, f"{ARCH}.expert_weights_norm", bool, False)
    config.update(
        n_routed_experts=experts,
        num_experts_per_tok=require_key(file, f"{ARCH}.expert_used_count", int),
        moe_intermediate_size=require_key(file, f"{ARCH}.expert_feed_forward_length", int),
        n_shared_experts=optional_key(file, f"{ARCH}.expert_shared_count", int, 0),
        routed_scaling_factor=float_key(file, f"{ARCH}.expert_weights_scale", 1.0) or 1.0,
        norm_topk_prob=norm,
        n_group=groups,
        topk_group=used_groups,
        scoring_func=_GATING[gating],
    )
    if gating == 2:  # DeepSeek-V3: sigmoid scores, bias-corrected selection among the best groups
        config.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            topk_method="noaux_tc",
            rope_interleave=True,  # llama.cpp's deepseek2 rope pairs adjacent channels
            num_nextn_predict_layers=0,  # MTP blocks are not mapped (map_tensors skips them)
        )
    else:
        config.update(
            architectures=["DeepseekV2ForCausalLM"],
            model_type="deepseek_v2",
            topk_method="group_limited_greedy" if used_groups < groups else "greedy",
        )
    return config


def _join_kv_b(file: GgufFile, tensors: dict[str, MappedTensor], prefix: str) -> None:
    """attn_k_b + attn_v_b -> one kv_b_proj entry, joined when read; the selection bias gets
    its transformers name."""
    bias = tensors.pop(f"{prefix}.mlp.gate.e_score_correction.bias", None)
    if bias is not None:
        name = f"{prefix}.mlp.gate.e_score_correction_bias"
        tensors[name] = replace(bias, name=name)
    k_b = tensors.pop(f"{prefix}.self_attn.k_b_proj.weight", None)
    v_b = tensors.pop(f"{prefix}.self_attn.v_b_proj.weight", None)
    if k_b is None and v_b is None:
        return
    if k_b is None or v_b is None:
        raise CheckpointError(f"{file.path}: {prefix}: attn_k_b and attn_v_b come in pairs; one is missing")
    ks, vs = k_b.gguf.shape, v_b.gguf.shape
    if len(ks) != 3 or len(vs) != 3 or ks[0] != vs[0] or ks[1] != vs[2]:
        raise CheckpointError(
            f"{file.path}: {k_b.gguf.name} {list(ks)} and {v_b.gguf.name} {list(vs)} are not "
            "[heads, kv_lora_rank, nope] and [heads, v, kv_lora_rank]"
        )
    name = f"{prefix}.self_attn.kv_b_proj.weight"
    if name in tensors:
        raise CheckpointError(f"{file.path}: {prefix}: both attn_kv_b and attn_k_b / attn_v_b")
    heads, rank, nope = ks
    tensors[name] = MappedTensor(
        k_b.gguf,
        name,
        False,
        joined=(v_b.gguf,),
        join=_join_kv_b_parts,
        joined_shape=(heads * (nope + vs[1]), rank),
    )


def _join_kv_b_parts(parts: list[Tensor]) -> Tensor:
    """W_UK^T [H, r, nope] and W_UV [H, v, r] (float) -> kv_b_proj's [H * (nope + v), r]."""
    k_b, v_b = parts
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1]).contiguous()
