"""Tiny GGUF models written with gguf-py's own writer, and their float twins as transformers
directories built from gguf-py's own dequantization (the independent reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

gguf = __import__("gguf")

# Byte offsets of each block's fp16 super-scales (ggml-common.h); random bytes elsewhere are valid.
FP16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}


def random_blocks(
    kind: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.01
) -> np.ndarray:
    """[rows, bytes per row] of valid blocks of GGML type `kind` (finite fp16 super-scales)."""
    qtype = gguf.GGMLQuantizationType[kind]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    count = rows * cols // block
    raw = rng.integers(0, 256, size=(count, nbytes), dtype=np.uint8)
    for at in FP16_FIELDS.get(kind, ()):
        values = (rng.standard_normal(count) * scale).astype(np.float16)
        raw[:, at : at + 2] = values.view(np.uint8).reshape(-1, 2)
    if kind == "Q8_K":
        raw[:, 0:4] = (rng.standard_normal(count) * scale).astype(np.float32).view(np.uint8).reshape(-1, 4)
    return raw.reshape(rows, cols // block * nbytes)


def q8_k_dequantize(raw: np.ndarray, rows: int) -> np.ndarray:
    """gguf-py has no Q8_K dequantizer: block_q8_K is {float d; int8 qs[256]; int16 bsums[16]}."""
    blocks = raw.reshape(-1, 292)
    d = blocks[:, 0:4].copy().view(np.float32)
    return (d * blocks[:, 4:260].copy().view(np.int8).astype(np.float32)).reshape(rows, -1)


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    if kind in ("F32", "F16"):
        return raw.astype(np.float32)
    if kind == "Q8_K":
        return q8_k_dequantize(raw, raw.shape[0])
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])


def _byte_vocab() -> tuple[list[str], list[str]]:
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    return [*chars, "Ġt", "he", "<|endoftext|>"], ["Ġ t", "h e"]


CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
}


def llama3_divisors(
    dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """llama.cpp's converter's rope_freqs for Llama 3.x: per frequency, what it is divided by."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original_max_position_embeddings / high_freq_factor:
            out.append(1.0)
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


MOE = ("qwen2moe", "qwen3moe")
EXPERTS, MOE_SIZE = 4, 256


def write_pair(
    root: Path,
    arch: str,
    kind: str,
    seed: int = 0,
    *,
    written_arch: str | None = None,
    pre: str = "qwen2",
    split_max_tensors: int = 0,
    llama3_rope: dict[str, float] | None = None,
    tied: bool = False,
) -> tuple[Path, Path]:
    """A GGUF file whose every matrix (embedding and LM head included) is random `kind` blocks,
    and the transformers directory holding gguf-py's dequantization of the same blocks.
    `split_max_tensors`: write `-0000i-of-0000N.gguf` parts instead (the first one is returned).
    `llama3_rope`: transformers' llama3 rope_scaling, stored as llama.cpp does (rope_freqs.weight)."""
    rng = np.random.default_rng(seed)
    tokens, merges = _byte_vocab()
    vocab = len(tokens)
    c = CONFIG
    h, inter, heads, kv, hd = (
        c[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
    )
    path = root / f"{arch}-{kind}.gguf"
    w = gguf.GGUFWriter(str(path), written_arch or arch, split_max_tensors=split_max_tensors)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    hf: dict[str, torch.Tensor] = {}

    def matrix(gguf_name: str, hf_name: str, rows: int, cols: int, heads_to_restore: int = 0) -> None:
        qkind = kind
        if kind in ("F32", "F16"):
            raw = (rng.standard_normal((rows, cols)) * 0.05).astype(
                np.float32 if kind == "F32" else np.float16
            )
            w.add_tensor(gguf_name, raw)
        else:
            raw = random_blocks(kind, rows, cols, rng)
            w.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType[qkind])
        dense = torch.from_numpy(np.ascontiguousarray(dequantize(raw, kind))).float()
        if heads_to_restore:  # llama.cpp interleaves each head's rotary halves; transformers does not
            dense = dense.view(heads_to_restore, rows // heads_to_restore // 2, 2, cols).transpose(1, 2)
            dense = dense.reshape(rows, cols)
        hf[hf_name] = dense

    def vector(gguf_name: str, hf_name: str, n: int, base: float = 1.0) -> None:
        values = (base + 0.1 * rng.standard_normal(n)).astype(np.float32)
        w.add_tensor(gguf_name, values)
        hf[hf_name] = torch.from_numpy(values)

    def stacked(gguf_name: str, proj: str, prefix: str, rows: int, cols: int) -> None:
        """[experts, rows, cols] in the file, one transformers weight per expert."""
        raws = [random_blocks(kind, rows, cols, rng) for _ in range(EXPERTS)]
        w.add_tensor(gguf_name, np.stack(raws), raw_dtype=gguf.GGMLQuantizationType[kind])
        for e, raw in enumerate(raws):
            hf[f"{prefix}.experts.{e}.{proj}.weight"] = torch.from_numpy(dequantize(raw, kind).copy()).float()

    def moe_layer(b: str, p: str) -> None:
        router = (rng.standard_normal((EXPERTS, h)) * 0.5).astype(np.float32)
        w.add_tensor(f"{b}.ffn_gate_inp.weight", router)
        hf[f"{p}.mlp.gate.weight"] = torch.from_numpy(router)
        stacked(f"{b}.ffn_gate_exps.weight", "gate_proj", f"{p}.mlp", MOE_SIZE, h)
        stacked(f"{b}.ffn_up_exps.weight", "up_proj", f"{p}.mlp", MOE_SIZE, h)
        stacked(f"{b}.ffn_down_exps.weight", "down_proj", f"{p}.mlp", h, MOE_SIZE)
        if arch == "qwen2moe":
            matrix(f"{b}.ffn_gate_shexp.weight", f"{p}.mlp.shared_expert.gate_proj.weight", inter, h)
            matrix(f"{b}.ffn_up_shexp.weight", f"{p}.mlp.shared_expert.up_proj.weight", inter, h)
            matrix(f"{b}.ffn_down_shexp.weight", f"{p}.mlp.shared_expert.down_proj.weight", h, inter)
            gate = (rng.standard_normal(h) * 0.1).astype(np.float32)  # llama.cpp stores it 1-D
            w.add_tensor(f"{b}.ffn_gate_inp_shexp.weight", gate)
            hf[f"{p}.mlp.shared_expert_gate.weight"] = torch.from_numpy(gate).reshape(1, h)

    if arch in MOE:
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(2)
        w.add_expert_feed_forward_length(MOE_SIZE)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(inter)
    if llama3_rope is not None:
        w.add_tensor("rope_freqs.weight", llama3_divisors(hd, c["rope_theta"], **llama3_rope))
    matrix("token_embd.weight", "model.embed_tokens.weight", vocab, h)
    vector("output_norm.weight", "model.norm.weight", h)
    if not tied:  # tied: no output.weight, the embedding is the LM head
        matrix("output.weight", "lm_head.weight", vocab, h)
    permute = arch == "llama"
    for i in range(c["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        vector(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight", h)
        vector(f"{b}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", h)
        matrix(f"{b}.attn_q.weight", f"{p}.self_attn.q_proj.weight", heads * hd, h, heads if permute else 0)
        matrix(f"{b}.attn_k.weight", f"{p}.self_attn.k_proj.weight", kv * hd, h, kv if permute else 0)
        matrix(f"{b}.attn_v.weight", f"{p}.self_attn.v_proj.weight", kv * hd, h)
        matrix(f"{b}.attn_output.weight", f"{p}.self_attn.o_proj.weight", h, heads * hd)
        if arch in ("qwen2", "qwen2moe"):
            for name, n in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                vector(f"{b}.attn_{name}.bias", f"{p}.self_attn.{name}_proj.bias", n, base=0.0)
        if arch in ("qwen3", "qwen3moe"):
            vector(f"{b}.attn_q_norm.weight", f"{p}.self_attn.q_norm.weight", hd)
            vector(f"{b}.attn_k_norm.weight", f"{p}.self_attn.k_norm.weight", hd)
        if arch in MOE:
            moe_layer(b, p)
            continue
        matrix(f"{b}.ffn_gate.weight", f"{p}.mlp.gate_proj.weight", inter, h)
        matrix(f"{b}.ffn_up.weight", f"{p}.mlp.up_proj.weight", inter, h)
        matrix(f"{b}.ffn_down.weight", f"{p}.mlp.down_proj.weight", h, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        path = sorted(root.glob(f"{arch}-{kind}-0*-of-*.gguf"))[0]

    from safetensors.torch import save_file

    from anyquant.loading.gguf_layout import ARCHITECTURES

    twin = root / f"{arch}-{kind}-float"
    twin.mkdir()
    name, model_type = ARCHITECTURES[arch]
    config = {
        **c,
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "eos_token_id": vocab - 1,
        "torch_dtype": "float32",
    }
    if llama3_rope is not None:
        config["rope_scaling"] = {"rope_type": "llama3", **llama3_rope}
    if arch in MOE:
        config.update(
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=MOE_SIZE,
            norm_topk_prob=arch == "qwen3moe",
            shared_expert_intermediate_size=inter,
            intermediate_size=MOE_SIZE,
        )
    (twin / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(twin / "model.safetensors"))
    return path, twin
