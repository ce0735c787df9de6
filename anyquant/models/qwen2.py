"""Qwen2 / Qwen2.5: the dense decoder with biases on q/k/v (not on o_proj)."""

from __future__ import annotations

from typing import Any

from anyquant.models.base import DecoderArgs, DecoderLM


def build(config: dict[str, Any]) -> DecoderLM:
    return DecoderLM(DecoderArgs.from_hf(config, qkv_bias=True, o_bias=False))
