"""Write a tiny random-weight MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) for tests and demos.

Owns the tiny MoE configurations. The weights are saved by transformers' own `save_pretrained`,
so tensor names are exactly what real checkpoints use (per-expert `experts.{e}.*`, Mixtral's
`block_sparse_moe`). Needs `transformers` (a test dependency), imported only when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from anyquant.utils.tiny_model import byte_tokenizer_json

# arch -> (transformers model_type, family fields). Sizes keep every Linear a multiple of 32 so
# that every writer (GPTQ needs [out, in] multiples of 32) can quantize every expert.
TINY_MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", {"num_local_experts": 4, "head_dim": 16}),
    # Layer 1 is dense; the shared expert is sigmoid-gated; selected weights are not renormalised.
    "qwen2_moe": (
        "qwen2_moe",
        {
            "num_experts": 6,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
        },
    ),
    # head_dim 32 != hidden / heads, as in the real Qwen3-MoE configs; layer 2 is dense.
    "qwen3_moe": (
        "qwen3_moe",
        {
            "num_experts": 8,
            "moe_intermediate_size": 32,
            "mlp_only_layers": [2],
            "norm_topk_prob": True,
            "head_dim": 32,
        },
    ),
}

_COMMON: dict[str, Any] = {
    "vocab_size": 259,  # the byte tokenizer: 256 bytes + <s>, </s>, <pad>
    "hidden_size": 64,
    "intermediate_size": 64,  # dense layers
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
}


def tiny_moe_fields(arch: str, **overrides: Any) -> dict[str, Any]:
    """transformers config fields of the tiny `arch` model, `overrides` applied."""
    if arch not in TINY_MOE:
        raise ValueError(f"unknown tiny MoE arch {arch!r}; choose {', '.join(sorted(TINY_MOE))}")
    return {**_COMMON, **TINY_MOE[arch][1], **overrides}


def write_tiny_moe_model(path: str | Path, arch: str = "mixtral", seed: int = 0, **overrides: Any) -> Path:
    import transformers

    out = Path(path)
    fields = tiny_moe_fields(arch, **overrides)
    config = transformers.AutoConfig.for_model(TINY_MOE[arch][0], **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    g = torch.Generator().manual_seed(seed)
    # transformers initialises routers to zero and weights at std 0.02; larger random weights make
    # routing decisive and every projection matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            r = torch.randn(param.shape, generator=g)
            param.copy_(1.0 + 0.1 * r if name.endswith("norm.weight") else 0.08 * r)
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text(byte_tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out
