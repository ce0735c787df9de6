"""Images for the multimodal tests: random pictures (seeded) and the prompt text of an image."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

# One image in a Qwen2-VL prompt: the processor expands the pad token to the image's tokens.
QWEN2_VL_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Uniform random pixels, the same for the same arguments; mode RGB, RGBA or L."""
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = (torch.rand(height, width, channels, generator=g) * 255).byte().numpy()
    return Image.fromarray(data[..., 0] if mode == "L" else data, mode)


def png_data_url(width: int, height: int, seed: int) -> str:
    """`random_image(width, height, seed)` as a PNG `data:` URL (what chat requests carry)."""
    buffer = io.BytesIO()
    random_image(width, height, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
