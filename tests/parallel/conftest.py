"""Tiny checkpoints for the tensor-parallel tests, built once per session on first use.

Sizes are chosen so that the interesting cases happen at tensor-parallel sizes 2 and 4: an MLP
intermediate of 3 groups of 32 (padded at both sizes), 4 query heads over 2 KV heads (KV heads
replicated at 4), a vocabulary of 259 (padded), tied embeddings, MoE experts of one group each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from anyquant.convert.quantize import quantize_checkpoint
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_model import write_tiny_model

IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66]


def _deepseek(path: Path, **overrides: Any) -> Path:
    """DeepSeek-V2 with q_lora, attention biases, a shared expert and group-limited routing."""
    transformers = pytest.importorskip("transformers")
    fields: dict[str, Any] = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=32,
        n_shared_experts=1,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        attention_bias=True,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config = transformers.DeepseekV2Config(**{**fields, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(
                1.0 + 0.2 * noise if "norm" in name else noise * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
            )
    model.save_pretrained(path)
    return path


def _moe(arch: str, seed: int, **overrides: Any) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        pytest.importorskip("transformers")
        from anyquant.utils.tiny_moe import write_tiny_moe_model

        return write_tiny_moe_model(path, arch, seed=seed, **overrides)

    return build


def _dense(arch: str, seed: int, **overrides: Any) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        return write_tiny_model(path, arch, seed=seed, **overrides)

    return build


def _quantized(
    source: str, fmt: str, options: WriteOptions, lm_head: bool = False
) -> tuple[str, str, WriteOptions, bool]:
    return (source, fmt, options, lm_head)


SOURCES: dict[str, Callable[[Path], Path]] = {
    "llama": _dense("llama", 1, intermediate_size=96),
    "llama128": _dense("llama", 3, hidden_size=128, head_dim=32, intermediate_size=160),
    "qwen2": _dense("qwen2", 4, intermediate_size=96),
    "qwen3-tied": _dense("qwen3", 2, intermediate_size=96, tie_word_embeddings=True),
    "qwen3-moe": _moe("qwen3_moe", 5),
    "qwen2-moe": _moe("qwen2_moe", 7),
    "deepseek-v2": _deepseek,
    # Expert parallelism: expert counts that 2 and 4 ranks cannot divide (uneven placements).
    "mixtral-e5": _moe("mixtral", 8, num_local_experts=5),
    "qwen3-moe-e7": _moe("qwen3_moe", 9, num_experts=7, num_experts_per_tok=3),
    "qwen2-moe-e5": _moe("qwen2_moe", 10, num_experts=5),
    "deepseek-v2-e9": lambda path: _deepseek(path, n_routed_experts=9, n_group=3, topk_group=2),
}
QUANTIZED: dict[str, tuple[str, str, WriteOptions, bool]] = {
    "awq": _quantized("llama", "awq", WriteOptions(bits=4, group_size=32)),
    "gptq-act-order": _quantized("llama", "gptq", WriteOptions(bits=4, group_size=32, act_order=True)),
    "ct-w4a16-lm-head": _quantized(
        "qwen2", "compressed-tensors", WriteOptions(scheme="W4A16", group_size=32), lm_head=True
    ),
    "fp8-block": _quantized("llama128", "fp8-block", WriteOptions(block_size=(32, 32))),
    "qwen3-moe-gptq": _quantized("qwen3-moe", "gptq", WriteOptions(bits=4, group_size=32, sym=True)),
    "qwen3-moe-e7-gptq": _quantized("qwen3-moe-e7", "gptq", WriteOptions(bits=4, group_size=32, sym=True)),
}


@pytest.fixture(scope="session")
def tp_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> checkpoint directory (a source model or a quantized one), built on first request."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name in SOURCES:
                built[name] = SOURCES[name](tmp_path_factory.mktemp(name))
            else:
                source, fmt, options, lm_head = QUANTIZED[name]
                out = tmp_path_factory.mktemp(name) / "q"
                quantize_checkpoint(get(source), out, fmt, options, quantize_lm_head=lm_head)
                built[name] = out
        return built[name]

    return get
