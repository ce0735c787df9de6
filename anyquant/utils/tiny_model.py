"""Write a tiny random-weight checkpoint with a real architecture (for tests and the demo fallback).

Owns the HF-style directory layout: config.json, model.safetensors, and a byte-level
tokenizer.json built with the `tokenizers` library. Nothing here is used when loading real models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def tiny_config(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    name, model_type = _ARCH[arch]
    config: dict[str, Any] = {
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": 259,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "torch_dtype": "float32",
    }
    if arch == "qwen3":
        config["attention_bias"] = False
    config.update(overrides)
    return config


def random_weights(config: dict[str, Any], seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """HF tensor names -> random tensors for a dense decoder config."""
    g = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    dtype = getattr(torch, config.get("torch_dtype", "float32"))
    arch = config["architectures"][0]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rnd(config["vocab_size"], h),
        "model.norm.weight": norm(h),
    }
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = rnd(config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm(h)
        t[f"{p}.post_attention_layernorm.weight"] = norm(h)
        for name, out, inp in (
            ("q", heads * hd, h),
            ("k", kv * hd, h),
            ("v", kv * hd, h),
            ("o", h, heads * hd),
        ):
            t[f"{p}.self_attn.{name}_proj.weight"] = rnd(out, inp)
        if arch == "Qwen2ForCausalLM" or config.get("attention_bias"):
            for name, out in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                t[f"{p}.self_attn.{name}_proj.bias"] = rnd(out)
            if config.get("attention_bias"):
                t[f"{p}.self_attn.o_proj.bias"] = rnd(h)
        if arch == "Qwen3ForCausalLM":
            t[f"{p}.self_attn.q_norm.weight"] = norm(hd)
            t[f"{p}.self_attn.k_norm.weight"] = norm(hd)
        t[f"{p}.mlp.gate_proj.weight"] = rnd(inter, h)
        t[f"{p}.mlp.up_proj.weight"] = rnd(inter, h)
        t[f"{p}.mlp.down_proj.weight"] = rnd(h, inter)
    return t


def byte_level_bpe() -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with no merges: ids 0-255 are the 256 bytes; each
    tiny checkpoint adds its own special tokens after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer_json() -> str:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <pad>."""
    from tokenizers import processors

    tok = byte_level_bpe()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    return str(tok.to_str())


def write_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(byte_tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out


if __name__ == "__main__":
    write_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "out/random-llama")
