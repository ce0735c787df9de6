"""Find a checkpoint's quantization format: config section -> registered `QuantFormat`.

Owns the dispatch on `quant_method` (formats.md §1.2) and the checks for quantized tensors in a
checkpoint that declares no quantization. Used by the loader and by `inspect` alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from anyquant.errors import QuantConfigError
from anyquant.quant.formats.base import HeaderIndex, QuantFormat
from anyquant.quant.registry import format_class, format_classes, known_quant_methods
from anyquant.quant.weight_types import WEIGHT_TYPES


class FoundQuantConfig(Protocol):
    @property
    def config(self) -> dict[str, Any]:
        """The quantization section's fields."""

    @property
    def where(self) -> str:
        """Where it was found, for messages, e.g. "config.json: quantization_config"."""


class QuantizedCheckpoint(Protocol):
    """What detection reads of a checkpoint: its headers and where it keeps its quantization
    section. The loader's `Checkpoint` (loading/checkpoint.py) is one."""

    @property
    def path(self) -> Path: ...

    @property
    def index(self) -> HeaderIndex: ...

    def quant_config(self) -> FoundQuantConfig | None: ...


def detect_format(ckpt: QuantizedCheckpoint) -> QuantFormat | None:
    """The checkpoint's format reader, or None for an unquantized checkpoint."""
    found = ckpt.quant_config()
    if found is None:
        _refuse_undeclared_quantization(ckpt)
        return None
    qc = found.config
    method = qc.get("quant_method") or qc.get("method")
    if method is None:
        # Older AutoGPTQ quantize_config.json has no quant_method; AutoAWQ's quant_config.json neither.
        if found.where == "quantize_config.json":
            method = "gptq"
        elif found.where == "quant_config.json":
            method = "awq"
        else:
            raise QuantConfigError(
                f"{ckpt.path}: {found.where} has no 'quant_method' field; "
                f"expected one of: {', '.join(known_quant_methods())}"
            )
    if not isinstance(method, str):
        raise QuantConfigError(f"{ckpt.path}: {found.where}: 'quant_method' must be a string, got {method!r}")
    cls = format_class(method.lower())
    return cls.from_checkpoint(qc, ckpt.index, f"{ckpt.path.name}/{found.where}")


def _refuse_undeclared_quantization(ckpt: QuantizedCheckpoint) -> None:
    # What only quantized checkpoints contain: each format's marker tensors, and weights in the
    # dtype a weight type stores unpacked codes in (I8, F8_E4M3, ...).
    suffixes = tuple(sorted({s for cls in format_classes() for s in cls.marker_suffixes}))
    dtypes = {t.stored_dtype for t in WEIGHT_TYPES.values() if t.stored_dtype is not None}
    for name in ckpt.index:
        info = ckpt.index.info(name)
        if name.endswith(suffixes) or (name.endswith(".weight") and info.dtype in dtypes):
            raise QuantConfigError(
                f"{ckpt.path}: tensor {name!r} ({info.dtype} {list(info.shape)}) looks quantized but neither "
                "config.json nor quantize_config.json / quant_config.json has a quantization_config; "
                "add the producing tool's quantization_config to config.json"
            )
