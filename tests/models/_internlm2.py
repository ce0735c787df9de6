"""Tiny InternLM2 checkpoints and the test-side mapping between InternLM2's and Llama's names.

transformers has no InternLM2 class: the reference is `LlamaForCausalLM` with the weights moved
by the mapping below, written from InternLM2's published modelling code (independent of anyquant):
`wqkv` rows are, per KV head, that head's `H / Hkv` query heads, then its key head, then its value
head; `w1` = gate, `w3` = up, `w2` = down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from anyquant.utils.tiny_model import byte_tokenizer_json, random_weights, tiny_config

_LAYER = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def internlm2_config(**overrides: Any) -> dict[str, Any]:
    """InternLM2Config keys (its `bias` instead of `attention_bias`, no head_dim)."""
    config = tiny_config("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config.pop("head_dim")
    config.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False)
    config.update(overrides)
    return config


def llama_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The equivalent transformers LlamaConfig fields."""
    out = {
        k: v
        for k, v in config.items()
        if k not in ("architectures", "model_type", "bias", "quantization_config")
    }
    out["attention_bias"] = bool(config.get("bias", True))
    return out


def _groups(config: dict[str, Any]) -> tuple[int, int, int]:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    return kv, heads // kv, config["hidden_size"] // heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Llama q/k/v rows (or biases) -> InternLM2's grouped wqkv rows."""
    kv, group, d = _groups(config)
    rest = q.shape[1:]
    qg = q.reshape(kv, group, d, *rest)
    return torch.cat((qg, k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)), dim=1).reshape(-1, *rest)


def split_qkv(wqkv: torch.Tensor, config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kv, group, d = _groups(config)
    rest = wqkv.shape[1:]
    g = wqkv.reshape(kv, group + 2, d, *rest)
    return g[:, :group].reshape(-1, *rest), g[:, group].reshape(-1, *rest), g[:, group + 1].reshape(-1, *rest)


def to_internlm2(
    llama: dict[str, torch.Tensor], config: dict[str, Any], prefix: str = ""
) -> dict[str, torch.Tensor]:
    out = {f"{prefix}model.tok_embeddings.weight": llama["model.embed_tokens.weight"]}
    out[f"{prefix}model.norm.weight"] = llama["model.norm.weight"]
    if "lm_head.weight" in llama:
        out[f"{prefix}output.weight"] = llama["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        src, dst = f"model.layers.{i}", f"{prefix}model.layers.{i}"
        for ours, theirs in _LAYER.items():
            for suffix in ("weight", "bias"):
                if f"{src}.{theirs}.{suffix}" in llama:
                    out[f"{dst}.{ours}.{suffix}"] = llama[f"{src}.{theirs}.{suffix}"]
        for suffix in ("weight", "bias"):
            parts = [llama.get(f"{src}.self_attn.{n}_proj.{suffix}") for n in "qkv"]
            if parts[0] is not None:
                q, k, v = parts
                assert k is not None and v is not None
                out[f"{dst}.attention.wqkv.{suffix}"] = fuse_qkv(q, k, v, config)
    return out


def to_llama(
    state: dict[str, torch.Tensor], config: dict[str, Any], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """InternLM2 names (dequantized weights) -> Llama names for transformers."""
    out = {"model.embed_tokens.weight": state[f"{prefix}model.tok_embeddings.weight"]}
    out["model.norm.weight"] = state[f"{prefix}model.norm.weight"]
    if f"{prefix}output.weight" in state:
        out["lm_head.weight"] = state[f"{prefix}output.weight"]
    for i in range(config["num_hidden_layers"]):
        src, dst = f"{prefix}model.layers.{i}", f"model.layers.{i}"
        for ours, theirs in _LAYER.items():
            for suffix in ("weight", "bias"):
                if f"{src}.{ours}.{suffix}" in state:
                    out[f"{dst}.{theirs}.{suffix}"] = state[f"{src}.{ours}.{suffix}"]
        for suffix in ("weight", "bias"):
            if f"{src}.attention.wqkv.{suffix}" in state:
                q, k, v = split_qkv(state[f"{src}.attention.wqkv.{suffix}"], config)
                for n, t in zip("qkv", (q, k, v)):
                    out[f"{dst}.self_attn.{n}_proj.{suffix}"] = t
    return out


def llama_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    cfg = dict(llama_config_of(config), architectures=["LlamaForCausalLM"])
    return random_weights(cfg, seed)


def write_internlm2(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random InternLM2 checkpoint (weights drawn in Llama layout, then fused)."""
    config = internlm2_config(**overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_internlm2(llama_weights(config, seed), config), str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text(byte_tokenizer_json())
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def llama_reference(config: dict[str, Any], llama_state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """transformers' LlamaForCausalLM holding `llama_state`, strictly loaded."""
    import transformers

    hf_config = transformers.LlamaConfig(**llama_config_of(config))
    model = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) for k, v in llama_state.items()}, strict=False
    )
    assert not unexpected, unexpected
    assert all(
        "rotary" in m or (config.get("tie_word_embeddings") and m == "lm_head.weight") for m in missing
    )
    return model
