"""Qwen3 dense: the dense decoder with per-head RMSNorm on q and k before rotary."""

from __future__ import annotations

from typing import Any

from anyquant.config_fields import cfg_bool
from anyquant.models.base import DecoderArgs, DecoderLM


def build(config: dict[str, Any]) -> DecoderLM:
    bias = cfg_bool(config, "attention_bias", False)
    return DecoderLM(DecoderArgs.from_hf(config, qk_norm=True, qkv_bias=bias, o_bias=bias))
