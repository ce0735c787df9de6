"""Tiny one-file checkpoints for the quantization-format tests: write tensors and a
`quantization_config` (`checkpoint`), detect the format as the loader does (`reader`), decode one
layer (`load_layer`), and the detection check every format's table of cases runs
(`check_detection`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.formats.base import QuantFormat
from anyquant.quant.registry import format_class
from anyquant.quant.weight import QuantWeight


def checkpoint(path: Path, tensors: dict[str, Tensor], qconfig: dict[str, Any]) -> Checkpoint:
    """`tensors` in path/model.safetensors, `qconfig` as config.json's quantization_config."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"quantization_config": qconfig}))
    return Checkpoint(path)


def reader(ckpt: Checkpoint) -> QuantFormat:
    """The format named by the checkpoint's quant_method, built from its config and index."""
    found = ckpt.quant_config()
    assert found is not None
    return format_class(found.config["quant_method"]).from_checkpoint(found.config, ckpt.index, "test")


def load_layer(fmt: QuantFormat, ckpt: Checkpoint, prefix: str) -> QuantWeight:
    """The canonical weight of the linear layer `prefix`, decoded from its stored tensors."""
    spec = fmt.spec_for(prefix, "linear")
    assert spec is not None, f"{prefix} detected as unquantized"
    names = [n for n in fmt.stored_names(prefix, spec).all() if n in ckpt.index]
    return fmt.decode(prefix, spec, ckpt.read_many(names))


def check_detection(
    tmp_path: Path, prefix: str, config: dict[str, Any], stored: dict[str, Any], kind: str, expected: Any
) -> None:
    """Layer `prefix` stored as `stored` ({suffix: (dtype, shape)}, zeros) under `config`: its
    detected spec for `kind` is `expected`, or, where `expected` is (error class, text), the
    detection raises that error naming the layer and the text."""
    tensors = {
        f"{prefix}.{suffix}": torch.zeros(shape, dtype=dtype) for suffix, (dtype, shape) in stored.items()
    }
    fmt = reader(checkpoint(tmp_path, tensors, config))
    if isinstance(expected, tuple):
        error, text = expected
        with pytest.raises(error) as info:
            fmt.spec_for(prefix, kind)  # type: ignore[arg-type]
        assert text in str(info.value) and prefix in str(info.value)
    else:
        assert fmt.spec_for(prefix, kind) == expected  # type: ignore[arg-type]
