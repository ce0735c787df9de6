"""Llama and Mistral (Llama-3 rope scaling included): the plain dense decoder."""

from __future__ import annotations

from typing import Any

from anyquant.models.base import DecoderArgs, DecoderLM


def build(config: dict[str, Any]) -> DecoderLM:
    return DecoderLM(DecoderArgs.from_hf(config))
