"""llama.cpp vision projector files (`mmproj-*.gguf`) for Qwen2-VL / Qwen2.5-VL language models.

Owns finding the projector (given, or the one `mmproj*.gguf` beside the language model in its
directory), reading its `clip.*` metadata into the `vision_config` (and the preprocessing the
image processor needs) of a transformers Qwen2-VL config, and its `v.*` / `mm.*` tensors into
the vision tower's names: llama.cpp's converter splits the fused qkv projection into q, k, v
and the Conv3d patch kernel into its two temporal slices; both are joined back when read.

The metadata does not carry everything: the merge size is 2 unless `clip.vision.spatial_merge_size`
says otherwise (llama.cpp's own default for these projectors), the temporal patch size is the 2
slices the converter writes, the pixel bounds are transformers' defaults unless
`clip.vision.image_min_pixels` / `image_max_pixels` are set, Qwen2.5-VL's window is 112 pixels
unless `clip.vision.window_size` is set, and the image token ids are looked up by their text
(`<|image_pad|>` ...) in the language model's vocabulary, as llama.cpp's mtmd does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import CheckpointError, UnsupportedError
from anyquant.loading.gguf_file import GgufFile, GgufTensor
from anyquant.loading.gguf_layout import MappedTensor, optional_key, require_key

# clip.projector_type -> (transformers architecture, model_type, Qwen2.5-VL)
PROJECTORS = {
    "qwen2vl_merger": ("Qwen2VLForConditionalGeneration", "qwen2_vl", False),
    "qwen2.5vl_merger": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", True),
}
# v.blk.{i}.<gguf> -> visual.blocks.{i}.<transformers> (per family where they differ)
_BLOCK_NAMES = {"ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj"}
_MLP_NAMES = {
    False: {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
    True: {"ffn_up": "mlp.up_proj", "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj"},
}
_GLOBAL_NAMES = {
    "v.post_ln": "visual.merger.ln_q",
    "mm.0": "visual.merger.mlp.0",
    "mm.2": "visual.merger.mlp.2",
}
_VISION_LINEAR = frozenset(
    ("attn.proj", "mlp.fc1", "mlp.fc2", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")
)
_IMAGE_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_DEFAULT_MIN_PIXELS, _DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # transformers' Qwen2-VL defaults


def find_mmproj(path: str | os.PathLike[str]) -> Path | None:
    """The projector beside a language model given as a directory (None when there is none)."""
    p = Path(path)
    if not p.is_dir():
        return None
    found = sorted(p.glob("mmproj*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise CheckpointError(f"{p}: several vision projectors ({names}); pass the one to use with --mmproj")
    return found[0] if found else None


def add_vision(text: GgufFile, config: dict[str, Any], tensors: dict[str, MappedTensor], path: Path) -> None:
    """Turn the text model's `config` / `tensors` (a qwen2vl file laid out as Qwen2) into the
    Qwen2-VL model with the projector at `path`."""
    clip = GgufFile(path)
    where = f"{clip.path}"
    if clip.get("general.architecture") != "clip" or not clip.get("clip.has_vision_encoder"):
        raise CheckpointError(
            f"{where}: not a vision projector (general.architecture = clip with a vision encoder)"
        )
    kind = clip.get("clip.projector_type", clip.get("clip.vision.projector_type"))
    if kind not in PROJECTORS:
        raise UnsupportedError(
            f"{where}: projector type {kind!r} is not supported; supported: {', '.join(PROJECTORS)}"
        )
    text_arch = text.get("general.architecture")
    if text_arch != "qwen2vl":
        raise CheckpointError(
            f"{where}: a {kind} projector belongs to a qwen2vl language model, not {text.path} ({text_arch})"
        )
    hf_arch, model_type, v25 = PROJECTORS[kind]
    vision = _vision_config(clip, v25, config["hidden_size"])
    sections = require_key(text, "qwen2vl.rope.dimension_sections", list)
    config.update(
        architectures=[hf_arch],
        model_type=model_type,
        vision_config=vision,
        rope_scaling={"type": "mrope", "mrope_section": [int(s) for s in sections[:3]]},
        preprocessor_config=_preprocessor(clip, vision),
        **_token_ids(text),
    )
    tensors.update(_map_tensors(clip, vision["depth"], v25))


def _vision_config(clip: GgufFile, v25: bool, lm_hidden: int) -> dict[str, Any]:
    width = require_key(clip, "clip.vision.embedding_length", int)
    ffn = require_key(clip, "clip.vision.feed_forward_length", int)
    depth = require_key(clip, "clip.vision.block_count", int)
    projection = require_key(clip, "clip.vision.projection_dim", int)
    if projection != lm_hidden:
        raise CheckpointError(
            f"{clip.path}: clip.vision.projection_dim = {projection} but the language model's width is {lm_hidden}"
        )
    common: dict[str, Any] = {
        "depth": depth,
        "num_heads": require_key(clip, "clip.vision.attention.head_count", int),
        "patch_size": require_key(clip, "clip.vision.patch_size", int),
        "spatial_merge_size": optional_key(clip, "clip.vision.spatial_merge_size", int, 2),
        "temporal_patch_size": 2,
        "in_chans": 3,
    }
    if not v25:
        return {
            **common,
            "embed_dim": width,
            "mlp_ratio": ffn / width,
            "hidden_size": projection,
            "hidden_act": "quick_gelu",
        }
    pattern = require_key(clip, "clip.vision.n_wa_pattern", int)
    return {
        **common,
        "hidden_size": width,
        "intermediate_size": ffn,
        "out_hidden_size": projection,
        "hidden_act": "silu",
        "window_size": optional_key(clip, "clip.vision.window_size", int, 112),
        # llama.cpp stores the period of Qwen2.5-VL's full-attention blocks (every n-th is full).
        "fullatt_block_indexes": list(range(pattern - 1, depth, pattern)) if pattern > 0 else [],
    }


def _preprocessor(clip: GgufFile, vision: dict[str, Any]) -> dict[str, Any]:
    mean = require_key(clip, "clip.vision.image_mean", list)
    std = require_key(clip, "clip.vision.image_std", list)
    return {
        # float32 in the file: the shortest decimal of each float32 (what the exporter wrote)
        "image_mean": [_float32_decimal(v) for v in mean],
        "image_std": [_float32_decimal(v) for v in std],
        "min_pixels": optional_key(clip, "clip.vision.image_min_pixels", int, _DEFAULT_MIN_PIXELS),
        "max_pixels": optional_key(clip, "clip.vision.image_max_pixels", int, _DEFAULT_MAX_PIXELS),
        "patch_size": vision["patch_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"],
    }


def _token_ids(text: GgufFile) -> dict[str, int]:
    tokens = text.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise CheckpointError(
            f"{text.path}: tokenizer.ggml.tokens is missing (needed to find the image tokens)"
        )
    ids = {tok: i for i, tok in enumerate(tokens) if tok in _IMAGE_TOKENS.values()}
    found = {key: ids[tok] for key, tok in _IMAGE_TOKENS.items() if tok in ids}
    missing = [tok for key, tok in _IMAGE_TOKENS.items() if key not in found and key != "video_token_id"]
    if missing:
        raise CheckpointError(
            f"{text.path}: the vocabulary has no {', '.join(missing)} token (Qwen2-VL's image tokens)"
        )
    return found


def _map_tensors(clip: GgufFile, depth: int, v25: bool) -> dict[str, MappedTensor]:
    t = clip.tensors
    out: dict[str, MappedTensor] = {}
    used: set[str] = set()

    def take(name: str) -> GgufTensor:
        if name not in t:
            raise CheckpointError(f"{clip.path}: tensor {name!r} is missing")
        used.add(name)
        return t[name]

    def add(gguf_prefix: str, hf_prefix: str, linear: bool) -> None:
        for kind in ("weight", "bias"):
            if f"{gguf_prefix}.{kind}" in t:
                hf = f"{hf_prefix}.{kind}"
                out[hf] = MappedTensor(take(f"{gguf_prefix}.{kind}"), hf, linear and kind == "weight")

    for gguf_name, hf_name in _GLOBAL_NAMES.items():
        add(gguf_name, hf_name, gguf_name.startswith("mm."))
    for i in range(depth):
        for role, part in {**_BLOCK_NAMES, **_MLP_NAMES[v25]}.items():
            add(f"v.blk.{i}.{role}", f"visual.blocks.{i}.{part}", part in _VISION_LINEAR)
        for kind in ("weight", "bias"):
            q, k, v = (take(f"v.blk.{i}.attn_{x}.{kind}") for x in "qkv")
            hf = f"visual.blocks.{i}.attn.qkv.{kind}"
            shape = (q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:])
            out[hf] = MappedTensor(q, hf, False, joined=(k, v), join=_concat_rows, joined_shape=shape)
    first, second = take("v.patch_embd.weight"), take("v.patch_embd.weight.1")
    embed, channels, p, _ = first.shape
    out["visual.patch_embed.proj.weight"] = MappedTensor(
        first,
        "visual.patch_embed.proj.weight",
        False,
        joined=(second,),
        join=_stack_temporal,
        joined_shape=(embed, channels, 2, p, p),
    )
    unknown = sorted(set(t) - used)
    if unknown:
        raise UnsupportedError(f"{clip.path}: tensor {unknown[0]!r} has no place in a Qwen2-VL vision tower")
    return out


def _concat_rows(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def _stack_temporal(parts: list[Tensor]) -> Tensor:
    """The Conv3d kernel [out, C, t, p, p] from its t = 2 slices [out, C, p, p]."""
    return torch.stack(parts, dim=2)


def _float32_decimal(value: float) -> float:
    import numpy as np

    return float(str(np.float32(value)))
