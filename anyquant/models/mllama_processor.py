"""Llama-3.2-Vision (mllama) image preprocessing and the cross-attention ranges of a prompt.

Follows the checkpoint's `preprocessor_config.json` as transformers' MllamaImageProcessor does:
RGB conversion; choose the tile canvas (rows x cols tiles, rows * cols <= max_image_tiles) that
upscales the image least, or else downscales it least (ties: the smaller canvas); resize the image
to fit that canvas keeping its aspect ratio (no side below one tile unless the canvas is smaller);
pad bottom/right with zeros to the canvas; rescale, normalise; cut into tiles row by row. Every
image is laid out as `max_image_tiles` tiles (the unused ones all zeros), with the id of its
(rows, cols) arrangement (`aspect_ratio_id`, 1-based) and its tile count.

The prompt's `<|image|>` token stays ONE token: the language model attends to the images through
cross-attention, and which prompt tokens attend which image follows the reference's rule
(`cross_attention_ranges`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from anyquant.config_fields import cfg_int
from anyquant.errors import CheckpointError
from anyquant.models.image_preprocessing import PixelNormalization, read_preprocessor_config
from anyquant.models.multimodal import (
    CrossImage,
    ImageInput,
    ImageInputError,
    ImageProcessor,
    image_digest,
    require_image,
    to_rgb,
)

_IMAGENET_STANDARD = (0.5, 0.5, 0.5)
_BILINEAR = 2


@lru_cache(maxsize=8)
def tile_arrangements(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(rows, cols) of every canvas of at most `max_tiles` tiles, in the reference's order (its
    aspect_ratio_id is the index + 1)."""
    return tuple(
        (a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles
    )


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles: the smallest upscale >= 1 if any canvas allows one, else the largest
    downscale; among equal scales the smallest canvas (the first one listed on a tie)."""
    scales = [min(r * tile / height, c * tile / width) for r, c in tile_arrangements(max_tiles)]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    candidates = [rc for rc, s in zip(tile_arrangements(max_tiles), scales) if s == chosen]
    return min(candidates, key=lambda rc: rc[0] * rc[1] * tile * tile)


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(height, width) of the resized image inside the canvas, aspect ratio kept."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


class MllamaImageProcessor(ImageProcessor):
    def __init__(
        self, model_dir: Path, config: dict[str, Any], image_size: int, max_num_tiles: int, patch_size: int
    ) -> None:
        pre = read_preprocessor_config(model_dir)
        where = str(Path(model_dir) / "preprocessor_config.json")
        size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
        assert isinstance(size, dict)
        self.tile = cfg_int(size, "height", image_size, where=f"{where} size")
        if cfg_int(size, "width", self.tile, where=f"{where} size") != self.tile:
            raise CheckpointError(f"{where}: size must be square (height == width), got {size}")
        self.max_tiles = cfg_int(pre, "max_image_tiles", max_num_tiles, minimum=1, where=where)
        if (self.tile, self.max_tiles) != (image_size, max_num_tiles):
            raise CheckpointError(
                f"{where}: tile size {self.tile} / max_image_tiles {self.max_tiles} disagree with "
                f"config.json's vision_config image_size {image_size} / max_num_tiles {max_num_tiles}"
            )
        for flag in ("do_resize", "do_pad"):
            if pre.get(flag, True) is not True:
                raise CheckpointError(f"{where}: {flag}=false is not supported (nor by the reference)")
        self.pixels = PixelNormalization.read(pre, where, _IMAGENET_STANDARD, _IMAGENET_STANDARD)
        self.do_convert_rgb = bool(pre.get("do_convert_rgb", True))
        self.resample = cfg_int(pre, "resample", _BILINEAR, minimum=0, where=where)
        self.image_token_id = cfg_int(config, "image_token_index", config.get("image_token_id", 128256))
        # Keys one tile yields in the language model's cross-attention (patches + class token).
        self.keys_per_tile = (image_size // patch_size) ** 2 + 1
        px = self.pixels
        self._settings = repr(
            (self.tile, self.max_tiles, px.mean, px.std, px.rescale_factor, px.do_rescale)
        ) + repr((px.do_normalize, self.do_convert_rgb, self.resample))

    def num_tokens_for(self, width: int, height: int) -> int:
        return 1

    @property
    def max_tokens_per_image(self) -> int:
        return 1

    def process(self, image: Any) -> ImageInput:
        from PIL import Image

        width, height = require_image(image)
        digest = image_digest(image, self._settings)
        rgb = image if image.mode == "RGB" or not self.do_convert_rgb else to_rgb(image)
        if rgb.mode != "RGB":
            raise ImageInputError(f"an image of mode {rgb.mode} needs do_convert_rgb")
        rows, cols = best_canvas(height, width, self.max_tiles, self.tile)
        h, w = fit_to_canvas(height, width, rows * self.tile, cols * self.tile, self.tile)
        if (w, h) != rgb.size:
            rgb = rgb.resize((w, h), resample=Image.Resampling(self.resample))
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
        canvas = torch.zeros(3, rows * self.tile, cols * self.tile, dtype=torch.float64)
        canvas[:, :h, :w] = pixels.permute(2, 0, 1).double()
        x = self.pixels.apply(canvas)
        t = self.tile
        tiles = x.reshape(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        packed = torch.zeros(self.max_tiles, 3, t, t)
        packed[: rows * cols] = tiles
        ratio_id = tile_arrangements(self.max_tiles).index((rows, cols)) + 1
        tensors = {
            "pixel_values": packed,
            "aspect_ratio_id": torch.tensor(ratio_id),
            "num_tiles": torch.tensor(rows * cols),
        }
        return ImageInput(tensors, 1, digest, encoder_rows=self.max_tiles * self.keys_per_tile)

    def expand_placeholders(
        self, token_ids: list[int], images: list[ImageInput]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Nothing to expand: each `<|image|>` token is one image, adjacent ones included."""
        where = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(where) != len(images):
            raise ImageInputError(
                f"the prompt has {len(where)} image token(s) ({self.image_token_id}) but {len(images)} "
                "image(s) were given; put one <|image|> per image"
            )
        return list(token_ids), [(i, 1) for i in where]

    def cross_images(self, token_ids: list[int], images: list[ImageInput]) -> list[CrossImage]:
        """Which prompt tokens attend which image, by the reference's rule: image i from its
        `<|image|>` token up to the next image's token; the last image (and any run of adjacent
        image tokens before it) through the end of the prompt and every generated token."""
        where = [start for start, _ in self.expand_placeholders(token_ids, images)[1]]
        ends = [*where[1:], -1]
        for i in range(len(where) - 2, -1, -1):  # adjacent image tokens share the next one's end
            if ends[i] == where[i] + 1:
                ends[i] = ends[i + 1]
        return [
            CrossImage(start, end, im.encoder_rows, int(im.tensors["num_tiles"]) * self.keys_per_tile)
            for start, end, im in zip(where, ends, images)
        ]
