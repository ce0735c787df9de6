"""Random-weight bf16 checkpoints of real shapes, written shard by shard, and their W4A16 copies:
the models the MoE and DeepSeek benchmarks (moe_cpu.py, mla_decode.py) build when no hub is
reachable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from anyquant.convert.quantize import quantize_checkpoint
from anyquant.quant.formats.base import WriteOptions


def randn(g: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


class ShardedCheckpoint:
    """A checkpoint folder filled one safetensors shard at a time (so no more than one layer's
    tensors are held), then closed with its index and config."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.weight_map: dict[str, str] = {}
        path.mkdir(parents=True, exist_ok=True)

    def shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(self.path / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))

    def finish(self, config: dict[str, Any]) -> Path:
        (self.path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": self.weight_map}, indent=1)
        )
        (self.path / "config.json").write_text(json.dumps(config, indent=2))
        return self.path


def build_w4a16(dense: Path, quant: Path, write_dense: Callable[[Path], object]) -> Path:
    """`quant`, the compressed-tensors W4A16 quantization of `dense` (written first if missing),
    unless it is already there."""
    if not (quant / "config.json").exists():
        if not (dense / "config.json").exists():
            write_dense(dense)
        quantize_checkpoint(dense, quant, "compressed-tensors", WriteOptions(scheme="W4A16"), overwrite=True)
    return quant
