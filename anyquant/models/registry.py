"""HF architecture name -> model family class, imported lazily; unknown names get the menu."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection
from typing import Any

from anyquant.errors import CheckpointError, UnsupportedError
from anyquant.models.protocol import CausalLM, check_causal_lm

# architecture -> (module, builder function name)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("anyquant.models.llama", "build"),
    "MistralForCausalLM": ("anyquant.models.llama", "build"),
    "Qwen2ForCausalLM": ("anyquant.models.qwen2", "build"),
    "Qwen3ForCausalLM": ("anyquant.models.qwen3", "build"),
    "DeepseekV2ForCausalLM": ("anyquant.models.deepseek_v2", "build"),
    "DeepseekV3ForCausalLM": ("anyquant.models.deepseek_v2", "build_v3"),
    "InternLM2ForCausalLM": ("anyquant.models.internlm2", "build"),
    "InternVLChatModel": ("anyquant.models.internvl", "build"),
    "MixtralForCausalLM": ("anyquant.models.mixtral", "build"),
    "MllamaForConditionalGeneration": ("anyquant.models.mllama", "build"),
    "Qwen2MoeForCausalLM": ("anyquant.models.qwen2_moe", "build"),
    "Qwen3MoeForCausalLM": ("anyquant.models.qwen3_moe", "build"),
    "Qwen2VLForConditionalGeneration": ("anyquant.models.qwen2_vl", "build"),
    "Qwen2_5_VLForConditionalGeneration": ("anyquant.models.qwen2_vl", "build_v25"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def architecture_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json: field 'architectures' = {archs!r:.80}; expected a list of names")
    if not archs:
        raise UnsupportedError(
            f"config.json has no 'architectures' field; supported: {', '.join(supported_architectures())}"
        )
    return archs[0]


def build_model(config: dict[str, Any], tensor_names: Collection[str] = ()) -> CausalLM:
    """Instantiate the family for `config` (callers wrap this in a meta-device context).

    Families whose checkpoints come in more than one naming layout (Mixtral) also take the
    checkpoint's tensor names; the others need only the config."""
    arch = architecture_of(config)
    if arch not in _ARCHITECTURES:
        raise UnsupportedError(
            f"config.json: architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    module, fn = _ARCHITECTURES[arch]
    builder = getattr(importlib.import_module(module), fn)
    if "tensor_names" in inspect.signature(builder).parameters:
        return check_causal_lm(builder(config, tensor_names=tensor_names), arch)
    return check_causal_lm(builder(config), arch)
