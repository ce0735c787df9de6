"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (q/k RMSNorm), sparse MoE MLP.

No shared expert; softmax routing with optional top-k renormalisation (`norm_topk_prob`).
Layer sparsity follows the Qwen MoE rule in `qwen2_moe`.
"""

from __future__ import annotations

from typing import Any

from anyquant.config_fields import cfg_bool
from anyquant.models.base import DecoderArgs, DecoderLM
from anyquant.models.qwen2_moe import qwen_moe_mlp


def build(config: dict[str, Any]) -> DecoderLM:
    bias = cfg_bool(config, "attention_bias", False)
    args = DecoderArgs.from_hf(config, qk_norm=True, qkv_bias=bias, o_bias=bias)
    return DecoderLM(args, make_mlp=qwen_moe_mlp(config, 128, 8, 768, shared=False))
