"""What the Hugging Face image processors of our vision-language families share: reading the
checkpoint's `preprocessor_config.json`, and its rescale-and-normalise step (`image_mean`,
`image_std`, `rescale_factor`, `do_rescale`, `do_normalize`) applied as transformers applies it:
the rescale in float64, the normalisation in float32. Each family's processor keeps its own
resizing, tiling or patching, and its own default mean and deviation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.config_fields import cfg_float, read_json_object
from anyquant.errors import CheckpointError


def read_preprocessor_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's preprocessor_config.json, or {} (every setting at its default) without one."""
    path = Path(model_dir) / "preprocessor_config.json"
    return read_json_object(path) if path.is_file() else {}


def _triple(cfg: dict[str, Any], key: str, default: tuple[float, ...], where: str) -> tuple[float, ...]:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, int | float):
        value = [value] * 3
    if not isinstance(value, list) or len(value) != 3:
        raise CheckpointError(f"{where}: field {key!r} = {value!r:.80}; expected 3 numbers")
    return tuple(cfg_float({"v": v}, "v", where=f"{where} {key}") for v in value)


@dataclass(frozen=True)
class PixelNormalization:
    """Per-channel mean and deviation (3 each), the rescale factor, and whether each step runs."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float
    do_rescale: bool
    do_normalize: bool

    @classmethod
    def read(
        cls, pre: dict[str, Any], where: str, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> PixelNormalization:
        """From the preprocessor settings `pre` (`where`: their file, for errors); `mean` and
        `std` are the family's defaults."""
        return cls(
            _triple(pre, "image_mean", mean, where),
            _triple(pre, "image_std", std, where),
            cfg_float(pre, "rescale_factor", 1 / 255, where=where),
            bool(pre.get("do_rescale", True)),
            bool(pre.get("do_normalize", True)),
        )

    def apply(self, x: Tensor) -> Tensor:
        """float64 pixels [3, ...] (0..255) -> float32, rescaled and normalised as configured."""
        if self.do_rescale:
            x = x * self.rescale_factor
        x = x.float()
        if self.do_normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
            x = (x - mean) / std
        return x
