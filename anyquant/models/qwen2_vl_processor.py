"""Qwen2-VL / Qwen2.5-VL image preprocessing (Pillow + torch) and M-RoPE prompt positions.

Follows the checkpoint's `preprocessor_config.json` as transformers' Qwen2VLImageProcessor does:
RGB conversion, resize so that both sides are multiples of patch_size * merge_size and the pixel
count lies within [min_pixels, max_pixels] (aspect ratio kept as closely as possible), rescale,
normalise, then cut into patches ordered merge-block by merge-block, each patch repeated over
the temporal patch size (a still image is a one-frame video). The grid (t, h, w) in patches
travels with the pixels; an image yields t * h * w / merge_size^2 embeddings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.config_fields import cfg_int
from anyquant.errors import CheckpointError
from anyquant.models.image_preprocessing import PixelNormalization, read_preprocessor_config
from anyquant.models.multimodal import (
    ImageInput,
    ImageInputError,
    ImageProcessor,
    image_digest,
    require_image,
    to_rgb,
)

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MAX_ASPECT = 200  # the reference refuses more extreme aspect ratios


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of `factor`, pixel count within the
    bounds, aspect ratio kept as closely as possible (the reference's rounding rules)."""
    if max(height, width) / min(height, width) > _MAX_ASPECT:
        raise ImageInputError(
            f"image of {width}x{height} pixels: aspect ratio above {_MAX_ASPECT} is not supported"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class Qwen2VLImageProcessor(ImageProcessor):
    def __init__(
        self,
        model_dir: Path,
        config: dict[str, Any],
        vision: dict[str, Any],
        pre: dict[str, Any] | None = None,
    ) -> None:
        """`pre`: the preprocessor settings when they do not come from preprocessor_config.json
        (a GGUF vision projector's metadata)."""
        where = (
            "the vision projector's metadata"
            if pre is not None
            else str(model_dir / "preprocessor_config.json")
        )
        pre = read_preprocessor_config(model_dir) if pre is None else pre
        size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
        assert isinstance(size, dict)
        # Older files give min/max_pixels, newer ones size.shortest_edge / longest_edge (pixels).
        self.min_pixels = cfg_int(
            pre, "min_pixels", size.get("shortest_edge") or size.get("min_pixels") or 56 * 56, where=where
        )
        self.max_pixels = cfg_int(
            pre,
            "max_pixels",
            size.get("longest_edge") or size.get("max_pixels") or 28 * 28 * 1280,
            where=where,
        )
        self.patch_size = cfg_int(pre, "patch_size", vision["patch_size"], where=where)
        self.temporal_patch_size = cfg_int(
            pre, "temporal_patch_size", vision["temporal_patch_size"], where=where
        )
        self.merge_size = cfg_int(pre, "merge_size", vision["spatial_merge_size"], where=where)
        if (self.patch_size, self.temporal_patch_size, self.merge_size) != (
            vision["patch_size"],
            vision["temporal_patch_size"],
            vision["spatial_merge_size"],
        ):
            raise CheckpointError(
                f"{where}: patch_size / temporal_patch_size / merge_size = {self.patch_size} / "
                f"{self.temporal_patch_size} / {self.merge_size} disagree with config.json's vision_config "
                f"({vision['patch_size']} / {vision['temporal_patch_size']} / {vision['spatial_merge_size']})"
            )
        if self.min_pixels > self.max_pixels:
            raise CheckpointError(f"{where}: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        self.pixels = PixelNormalization.read(pre, where, _CLIP_MEAN, _CLIP_STD)
        self.do_resize = bool(pre.get("do_resize", True))
        self.resample = cfg_int(pre, "resample", 3, minimum=0, where=where)  # PIL's BICUBIC
        self.image_token_id = cfg_int(config, "image_token_id", 151655, minimum=0)
        self.vision_start_token_id = cfg_int(config, "vision_start_token_id", 151652, minimum=0)
        px = self.pixels
        self._settings = repr(
            (self.min_pixels, self.max_pixels, self.patch_size, self.temporal_patch_size, self.merge_size)
        ) + repr((px.mean, px.std, px.rescale_factor, self.do_resize, px.do_rescale, px.do_normalize))
        self._settings += f"resample={self.resample}"

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after resizing."""
        if not self.do_resize:
            return height, width
        return smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )

    def num_tokens_for(self, width: int, height: int) -> int:
        h, w = self.target_size(width, height)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    @property
    def max_tokens_per_image(self) -> int:
        return self.max_pixels // (self.patch_size * self.merge_size) ** 2

    def process(self, image: Any) -> ImageInput:
        from PIL import Image

        width, height = require_image(image)
        digest = image_digest(image, self._settings)
        rgb = image if image.mode == "RGB" else to_rgb(image)
        h, w = self.target_size(width, height)
        factor = self.patch_size * self.merge_size
        if h % factor or w % factor:
            raise ImageInputError(
                f"image of {width}x{height} pixels: without resizing, both sides must be multiples of {factor}"
            )
        if (w, h) != rgb.size:
            rgb = rgb.resize((w, h), resample=Image.Resampling(self.resample))
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
        x = self.pixels.apply(pixels.permute(2, 0, 1).double())
        patches, grid_h, grid_w = self._patchify(x)
        grid = torch.tensor([1, grid_h, grid_w], dtype=torch.long)
        tokens = grid_h * grid_w // self.merge_size**2
        return ImageInput({"pixel_values": patches, "grid_thw": grid}, tokens, digest)

    def _patchify(self, x: Tensor) -> tuple[Tensor, int, int]:
        """[C, H, W] -> [grid_h * grid_w, C * t * p * p], patches in merge-block order."""
        c, height, width = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        blocks = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        # (gh/m, gw/m, m, m, C, p, p) -> a temporal axis after C: the one frame repeated t times
        frames = blocks[:, :, :, :, :, None].expand(*blocks.shape[:5], t, p, p)
        return frames.reshape(gh * gw, c * t * p * p).contiguous(), gh, gw

    def prompt_positions(
        self, token_ids: list[int], images: list[ImageInput], spans: list[tuple[int, int]]
    ) -> tuple[Tensor | None, int]:
        """M-RoPE: text tokens advance all three rows together; an image's tokens take (t, h, w)
        grid coordinates (after merging) offset by the position where the image starts, and the
        text after it resumes at that start + the larger of the grid's height and width."""
        if not images:
            return None, 0
        rows: list[Tensor] = []
        at, pos = 0, 0
        for (start, length), image in zip(spans, images):
            if start > at:
                rows.append(torch.arange(pos, pos + start - at).expand(3, -1))
                pos += start - at
            t, h, w = (int(v) for v in image.tensors["grid_thw"])
            h, w = h // self.merge_size, w // self.merge_size
            grid = torch.stack(
                torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            ).reshape(3, -1)
            rows.append(grid + pos)
            pos += max(h, w)
            at = start + length
        if at < len(token_ids):
            rows.append(torch.arange(pos, pos + len(token_ids) - at).expand(3, -1))
            pos += len(token_ids) - at
        positions = torch.cat(rows, dim=1)
        return positions, int(positions.max()) + 1 - len(token_ids)
