"""Shared by the convert tests: tiny checkpoints, byte-level comparison, per-layer dequantization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.loader import build_on_meta
from anyquant.loading.plan import linear_layers
from anyquant.quant.detect import detect_format
from anyquant.quant.reference import dequantize


def tensors(path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor (name, dtype, shape, bytes), config.json and side files identical."""
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        x, y = ta[name], tb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(
            x.view(torch.uint8) if x.element_size() == 1 else x,
            y.view(torch.uint8) if y.element_size() == 1 else y,
        ), name
    assert config(a) == config(b)
    side = {p.name for p in a.glob("*.json")} | {p.name for p in b.glob("*.json")}
    for name in side:
        assert (a / name).read_text() == (b / name).read_text(), name


def dequantized_layers(path: Path) -> dict[str, Tensor]:
    """prefix -> float64 dense weight, decoded by the checkpoint's own reader (the loader's path)."""
    ckpt = Checkpoint(path)
    fmt = detect_format(ckpt)
    assert fmt is not None
    model = build_on_meta(ckpt.text_config(), ckpt.index.names())
    out = {}
    for layer in linear_layers(model):
        spec = fmt.spec_for(layer.prefix, layer.kind)
        if spec is None:
            out[layer.prefix] = (
                ckpt.read(f"{layer.prefix}.weight").double()
                if f"{layer.prefix}.weight" in ckpt.index
                else None
            )
            continue
        names = [n for n in fmt.stored_names(layer.prefix, spec).all() if n in ckpt.index]
        weight = fmt.decode(layer.prefix, spec, ckpt.read_many(names))
        out[layer.prefix] = dequantize(weight, torch.float64)
    return out
