"""Qwen2-VL and Qwen2.5-VL: a Qwen2 decoder with M-RoPE, plus a vision transformer whose merged
patch embeddings replace the image placeholder tokens.

Both tensor layouts real checkpoints use are read: the hub's (`model.layers.*`, `visual.*`) and
transformers 5's (`model.language_model.*`, `model.visual.*`); `lm_head` is top-level in both.
Configs: flat (hub; `rope_scaling: {type: mrope, mrope_section}`) or nested (`text_config`,
`vision_config`, `rope_parameters`); the loader hands the language model's fields with the
top-level ones (vision_config, token ids) alongside.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anyquant.config_fields import cfg_dict, cfg_int_list
from anyquant.errors import CheckpointError
from anyquant.layers.rotary import MRotaryEmbedding, rope_parameters
from anyquant.models.base import DecoderArgs, DecoderLM
from anyquant.models.multimodal import ImageInput, ImageProcessor
from anyquant.models.qwen2_vl_processor import Qwen2VLImageProcessor
from anyquant.models.qwen2_vl_vision import VisionArgs, VisionTransformer

_DEFAULT_MROPE_SECTION = [16, 24, 24]


def uses_nested_names(tensor_names: Collection[str]) -> bool:
    """transformers 5 nests the decoder and the vision tower under `model.`."""
    return any(n.startswith(("model.language_model.", "model.visual.")) for n in tensor_names)


def mrope_rope(config: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """(plain rope parameters, mrope_section): `mrope` is default RoPE with sections."""
    raw = {**cfg_dict(config, "rope_parameters"), **cfg_dict(config, "rope_scaling")}
    sections = cfg_int_list(raw, "mrope_section", where="config.json rope_scaling") or _DEFAULT_MROPE_SECTION
    clean = dict(config)
    for key in ("rope_parameters", "rope_scaling"):
        value = cfg_dict(config, key)
        if value:
            value = {k: v for k, v in value.items() if k != "mrope_section"}
            if value.get("type") == "mrope":
                value["type"] = "default"
            if value.get("rope_type") == "mrope":
                value["rope_type"] = "default"
            clean[key] = value
    return rope_parameters(clean), sections


class Qwen2VLForConditionalGeneration(DecoderLM):
    def __init__(self, config: dict[str, Any], tensor_names: Collection[str], v25: bool) -> None:
        nested = uses_nested_names(tensor_names)
        args = DecoderArgs.from_hf(config, qkv_bias=True, o_bias=False)
        rope, sections = mrope_rope(config)
        rotary = MRotaryEmbedding(args.head_dim, rope, args.max_position, sections)
        super().__init__(args, rotary=rotary, body_path="model.language_model" if nested else "model")
        vision = cfg_dict(config, "vision_config")
        if not vision:
            raise CheckpointError("config.json: vision_config is missing (needed by a Qwen2-VL model)")
        self.config = config
        self.vision_args = VisionArgs.from_hf(vision, args.hidden_size, v25)
        if self.vision_args.out_size != args.hidden_size:
            raise CheckpointError(
                f"config.json: the vision merger's output size {self.vision_args.out_size} differs from "
                f"the language model's hidden_size {args.hidden_size}"
            )
        self.visual_path = "model.visual" if nested else "visual"
        owner: nn.Module = self.get_submodule("model") if nested else self
        # Registered once, at its checkpoint path (module paths are the checkpoint's names).
        owner.add_module("visual", VisionTransformer(self.visual_path, self.vision_args))

    @property
    def vision_tower(self) -> VisionTransformer:
        tower = self.get_submodule(self.visual_path)
        assert isinstance(tower, VisionTransformer)
        return tower

    def image_processor(self, model_dir: Path) -> ImageProcessor:
        v = self.vision_args
        return Qwen2VLImageProcessor(
            Path(model_dir),
            self.config,
            {
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
            },
            cfg_dict(self.config, "preprocessor_config") or None,  # set by a GGUF projector
        )

    def embed_images(self, images: list[ImageInput]) -> list[Tensor]:
        """Run the vision tower once over all `images` -> [num_tokens, hidden] per image."""
        tower = self.vision_tower
        pixels = torch.cat([im.tensors["pixel_values"] for im in images]).to(tower.device)
        grids = [(int(t), int(h), int(w)) for t, h, w in (im.tensors["grid_thw"].tolist() for im in images)]
        with torch.inference_mode():
            merged = tower(pixels, grids)
        return list(merged.split([im.num_tokens for im in images]))


def build(config: dict[str, Any], tensor_names: Collection[str] = ()) -> DecoderLM:
    return Qwen2VLForConditionalGeneration(config, tensor_names, v25=False)


def build_v25(config: dict[str, Any], tensor_names: Collection[str] = ()) -> DecoderLM:
    return Qwen2VLForConditionalGeneration(config, tensor_names, v25=True)
