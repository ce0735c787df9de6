"""What a GGUF model is in transformers' terms: config.json fields and tensor names.

Owns the translation of GGUF metadata (`{arch}.block_count`, `{arch}.attention.head_count` ...)
into the config dict the model families already read, of GGUF tensor names (`blk.0.attn_q.weight`)
into the checkpoint names they expect (`model.layers.0.self_attn.q_proj.weight`), and of
llama.cpp's row order for Llama's q/k projections (its converter interleaves the two rotary
halves of every head for GGML's rope; transformers' rotate_half wants them split) back to
transformers'. Architectures by `general.architecture`; anything else is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import CheckpointError, UnsupportedError
from anyquant.loading.gguf_file import GgufFile, GgufTensor

# general.architecture -> (transformers architecture, model_type)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    # Qwen2-VL / Qwen2.5-VL's language model: alone, a Qwen2 (text positions turn M-RoPE's three
    # sections alike, so it is plain RoPE); with its vision projector, see gguf_mmproj.py.
    "qwen2vl": ("Qwen2ForCausalLM", "qwen2"),
    # DeepSeek-V2 / V3 latent attention: laid out by gguf_deepseek.py (V3 when routed by sigmoid).
    "deepseek2": ("DeepseekV2ForCausalLM", "deepseek_v2"),
}
_MOE = frozenset(("qwen2moe", "qwen3moe"))

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.{i}.<gguf> -> model.layers.{i}.<transformers>
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Mixture of experts: the router, the shared expert and its gate; stacked experts below.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# [experts, out, in] tensors, one transformers module per expert: mlp.experts.{e}.<name>.
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Matrices multiplied by activations: their quantized blocks go to the quant format (kernels);
# every other tensor (embedding, norms) is dequantized when read.
LINEAR_ROLES = frozenset(
    (
        *("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
        *("ffn_gate_inp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp"),
        *EXPERT_NAMES,
    )
)
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class MappedTensor:
    gguf: GgufTensor
    name: str  # transformers name
    linear: bool  # a linear layer's weight (quantized blocks stay quantized)
    interleaved_heads: int = 0  # Llama q/k: rows to restore to rotate_half order, in this many heads
    expert: int | None = None  # one expert's [out, in] slice of a stacked [experts, out, in] tensor
    # One transformers tensor that llama.cpp's converter split into several (DeepSeek's kv_b_proj,
    # a vision tower's qkv and temporal patch kernels): read as `join([gguf, *joined])` of the
    # parts in float32, in shape `joined_shape`.
    joined: tuple[GgufTensor, ...] = ()
    join: Callable[[list[Tensor]], Tensor] | None = None
    joined_shape: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The transformers shape (a router vector stored 1-D by llama.cpp becomes [1, in])."""
        if self.join is not None:
            return self.joined_shape
        shape = self.gguf.shape if self.expert is None else self.gguf.shape[1:]
        return (1, *shape) if self.linear and len(shape) == 1 else shape


@dataclass(frozen=True)
class GgufLayout:
    config: dict[str, Any]
    tensors: dict[str, MappedTensor]  # by transformers name


def require_key(file: GgufFile, key: str, kind: type) -> Any:
    value = file.get(key)
    if value is None:
        raise CheckpointError(f"{file.path}: metadata key {key!r} is missing")
    if kind is int and isinstance(value, list):
        raise UnsupportedError(
            f"{file.path}: metadata key {key!r} varies per layer ({value[:4]}...); not supported"
        )
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(f"{file.path}: metadata key {key!r} = {value!r:.80}; expected {kind.__name__}")
    return value


def optional_key(file: GgufFile, key: str, kind: type, default: Any) -> Any:
    return default if file.get(key) is None else require_key(file, key, kind)


def float_key(file: GgufFile, key: str, default: float) -> float:
    value = file.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(f"{file.path}: metadata key {key!r} = {value!r:.80}; expected a number")
    import numpy as np

    # GGUF stores float32: 1e-5 arrives as 9.99999974738e-06. Take the shortest decimal that is
    # the same float32 (what the exporting config said).
    return float(str(np.float32(value)))


def architecture(file: GgufFile) -> str:
    arch = require_key(file, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"{file.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return str(arch)


# Llama-3 rope scaling grid: llama.cpp stores only the resulting per-frequency divisors
# (`rope_freqs.weight`); the published Llama 3.x models use the first of each.
_LLAMA3_GRID = [
    (low, high, old)
    for old in (8192, 4096, 16384, 2048, 32768)
    for low in (1.0, 2.0)
    for high in (4.0, 8.0, 2.0)
    if high > low
]


def _llama3_from_rope_freqs(file: GgufFile, head_dim: int, theta: float) -> dict[str, Any]:
    """transformers' llama3 rope_scaling whose divisors equal the file's `rope_freqs.weight`
    (llama.cpp's converter computes them from that rope_scaling); else an error naming it."""
    from anyquant.layers.rotary import inverse_frequencies

    t = file.tensors["rope_freqs.weight"]
    if t.ggml_type != "F32" or t.shape != (head_dim // 2,):
        raise CheckpointError(
            f"{file.path}: tensor 'rope_freqs.weight' is {t.ggml_type} {list(t.shape)}; expected F32 [{head_dim // 2}]"
        )
    stored = torch.from_numpy(t.data.copy()).double()
    factor = float(stored.max())
    plain, _ = inverse_frequencies(head_dim, {"rope_theta": theta, "rope_type": "default"}, 0)
    for low, high, old in _LLAMA3_GRID:
        params = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": old,
        }
        scaled, _ = inverse_frequencies(head_dim, {"rope_theta": theta, **params}, 0)
        if torch.allclose(plain.double() / scaled.double(), stored, rtol=1e-5, atol=0):
            return {"rope_scaling": params}
    raise UnsupportedError(
        f"{file.path}: tensor 'rope_freqs.weight' (per-frequency rope divisors, max {factor:g}) matches no "
        "Llama-3 rope scaling anyquant knows; not supported"
    )


def rope_config(file: GgufFile, arch: str, head_dim: int, theta: float) -> dict[str, Any]:
    kind = file.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in file.tensors:
        if kind not in (None, "none"):
            raise UnsupportedError(
                f"{file.path}: both rope_freqs.weight and {arch}.rope.scaling.type = {kind!r}"
            )
        return _llama3_from_rope_freqs(file, head_dim, theta)
    if kind in (None, "none"):
        return {}
    factor = float_key(file, f"{arch}.rope.scaling.factor", 1.0)
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": factor}}
    if kind == "yarn":
        original = require_key(file, f"{arch}.rope.scaling.original_context_length", int)
        scaling: dict[str, Any] = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
        }
        for key in ("beta_fast", "beta_slow"):
            if file.get(f"{arch}.rope.scaling.yarn_{key}") is not None:
                scaling[key] = float_key(file, f"{arch}.rope.scaling.yarn_{key}", 0.0)
        return {"rope_scaling": scaling}
    raise UnsupportedError(f"{file.path}: metadata {arch}.rope.scaling.type = {kind!r} is not supported")


def auto_dtype(types: set[str]) -> str:
    """The compute dtype `auto` picks: float32 for float32 files (stories-size models, tests),
    bfloat16 for everything else: quantized files (the fast CPU kernels' vector path), BF16 files,
    and F16 files, which llama.cpp's converter usually writes from a bfloat16 model, so that their
    values are bfloat16 values exactly (GgufCheckpoint warns about any that are not; dtype=float32
    keeps them as they are, at twice the memory and half the speed)."""
    return "float32" if types <= {"F32"} else "bfloat16"


def build_layout(file: GgufFile) -> GgufLayout:
    arch = architecture(file)
    hf_arch, model_type = ARCHITECTURES[arch]
    tensors = map_tensors(file, arch)
    hidden = require_key(file, f"{arch}.embedding_length", int)
    heads = require_key(file, f"{arch}.attention.head_count", int)
    kv_heads = optional_key(file, f"{arch}.attention.head_count_kv", int, heads)
    head_dim = optional_key(file, f"{arch}.attention.key_length", int, hidden // max(heads, 1))
    rotary = optional_key(file, f"{arch}.rope.dimension_count", int, head_dim)
    if rotary != head_dim:
        raise UnsupportedError(
            f"{file.path}: {arch}.rope.dimension_count = {rotary} rotates part of a head of {head_dim}; "
            "partial rotary embeddings are not supported for this architecture"
        )
    theta = float_key(file, f"{arch}.rope.freq_base", 10000.0)
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"{file.path}: tensor 'token_embd.weight' is missing")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": require_key(
            file,
            f"{arch}.feed_forward_length" if arch not in _MOE else f"{arch}.expert_feed_forward_length",
            int,
        ),
        "num_hidden_layers": require_key(file, f"{arch}.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": embed.gguf.shape[0],
        "max_position_embeddings": optional_key(file, f"{arch}.context_length", int, 2048),
        "rms_norm_eps": float_key(file, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "tie_word_embeddings": False,  # a missing output.weight is aliased to the embedding (_map_tensors)
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        "hidden_act": "silu",
        "torch_dtype": auto_dtype({t.gguf.ggml_type for t in tensors.values() if t.linear}),
        **rope_config(file, arch, head_dim, theta),
        **(_moe(file, arch) if arch in _MOE else {}),
    }
    config.update(special_token_config(file))
    return GgufLayout(config, tensors)


def special_token_config(file: GgufFile) -> dict[str, Any]:
    config: dict[str, Any] = {}
    bos = file.get("tokenizer.ggml.bos_token_id")
    if isinstance(bos, int):
        config["bos_token_id"] = bos
    # Generation stops at end of text and at end of turn / message (llama.cpp's end-of-generation set).
    ends = [file.get(f"tokenizer.ggml.{f}_token_id") for f in ("eos", "eot", "eom")]
    ends = list(dict.fromkeys(e for e in ends if isinstance(e, int)))
    if ends:
        config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return config


def _moe(file: GgufFile, arch: str) -> dict[str, Any]:
    """Every layer sparse (llama.cpp's qwen MoE graphs have no dense layers); llama.cpp renormalizes
    the top-k weights for Qwen3-MoE and not for Qwen2-MoE, as their transformers configs do."""
    config: dict[str, Any] = {
        "num_experts": require_key(file, f"{arch}.expert_count", int),
        "num_experts_per_tok": require_key(file, f"{arch}.expert_used_count", int),
        "moe_intermediate_size": require_key(file, f"{arch}.expert_feed_forward_length", int),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": arch == "qwen3moe",
    }
    if arch == "qwen2moe":
        config["shared_expert_intermediate_size"] = require_key(
            file, f"{arch}.expert_shared_feed_forward_length", int
        )
    return config


def map_tensors(
    file: GgufFile,
    arch: str,
    layer_names: dict[str, str] = LAYER_NAMES,
    linear_roles: frozenset[str] = LINEAR_ROLES,
    num_layers: int | None = None,
) -> dict[str, MappedTensor]:
    """GGUF tensors under transformers names; `num_layers`: blocks from there on are skipped
    (DeepSeek's multi-token-prediction blocks serve only speculative decoding)."""
    heads = file.get(f"{arch}.attention.head_count")
    kv_heads = file.get(f"{arch}.attention.head_count_kv", heads)
    out: dict[str, MappedTensor] = {}
    for name, t in file.tensors.items():
        if name == "rope_freqs.weight":  # read into the config's rope_scaling (rope_config)
            continue
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = MappedTensor(t, _GLOBAL_NAMES[name], linear=name == "output.weight")
            continue
        match = _BLOCK.match(name)
        if match is not None and num_layers is not None and int(match[1]) >= num_layers:
            continue
        if match is not None and match[2] in EXPERT_NAMES:
            _map_experts(file, t, int(match[1]), EXPERT_NAMES[match[2]], out)
            continue
        part = match and layer_names.get(match[2])
        if match is None or not part:
            raise UnsupportedError(
                f"{file.path}: tensor {name!r} has no place in a {arch} model (unknown GGUF tensor name)"
            )
        layer, role, kind = match[1], match[2], match[3]
        interleaved = 0
        if arch == "llama" and role in ("attn_q", "attn_k"):
            interleaved = int(heads if role == "attn_q" else kv_heads)
        hf = f"model.layers.{layer}.{part}.{kind}"
        out[hf] = MappedTensor(
            t, hf, linear=role in linear_roles and kind == "weight", interleaved_heads=interleaved
        )
    embed = out.get("model.embed_tokens.weight")
    if "lm_head.weight" not in out and embed is not None:
        # Tied embeddings (no output.weight): the LM head reads the same stored tensor as a linear
        # weight, so a quantized table stays quantized for the matmul (the kernels repack their
        # own copy of a tied head anyway) while the lookup table is dequantized.
        out["lm_head.weight"] = MappedTensor(embed.gguf, "lm_head.weight", linear=True)
    return out


def _map_experts(file: GgufFile, t: GgufTensor, layer: int, proj: str, out: dict[str, MappedTensor]) -> None:
    if len(t.shape) != 3:
        raise CheckpointError(
            f"{file.path}: tensor {t.name!r} has shape {list(t.shape)}; expected [experts, out, in]"
        )
    for e in range(t.shape[0]):
        hf = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        out[hf] = MappedTensor(t, hf, linear=True, expert=e)


def rotate_half_rows(rows: Tensor, heads: int, name: str) -> Tensor:
    """Undo llama.cpp's per-head interleave of the rotary halves on the rows of a q/k projection
    (weights in any row-wise encoding, or biases): GGUF row (h, i, j) holds transformers row
    (h, j, i) for i < head_dim / 2, j in {0, 1}."""
    n = rows.shape[0]
    if heads <= 0 or n % (2 * heads):
        raise CheckpointError(f"tensor {name!r}: {n} rows do not split into {heads} heads of rotary pairs")
    order = torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(-1)
    return rows.index_select(0, order)


def gguf_tensor_name(name: str) -> str | None:
    """The GGUF name llama.cpp's converter gives a transformers tensor (dense models), or None."""
    for gguf_name, hf in _GLOBAL_NAMES.items():
        if hf == name:
            return gguf_name
    match = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if match is None:
        return None
    for role, part in LAYER_NAMES.items():
        if part == match[2]:
            return f"blk.{match[1]}.{role}.{match[3]}"
    return None


def interleave_half_rows(rows: Tensor, heads: int, name: str) -> Tensor:
    """The inverse of `rotate_half_rows`: transformers' q/k rows in llama.cpp's order."""
    n = rows.shape[0]
    if heads <= 0 or n % (2 * heads):
        raise CheckpointError(f"tensor {name!r}: {n} rows do not split into {heads} heads of rotary pairs")
    order = torch.arange(n).view(heads, 2, n // heads // 2).transpose(1, 2).reshape(-1)
    return rows.index_select(0, order)
