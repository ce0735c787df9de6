"""The `QuantFormat` interface: read (and write) one family of quantized checkpoints.

A format answers which layers are quantized and how (`spec_for`), which tensors on disk make up
a layer (`stored_names`), and translates them into the canonical `QuantWeight` (`decode`).
It never touches modules, devices, ranks or kernels. Writing is a separate small interface
(`FormatWriter`) used by `anyquant quantize`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from anyquant.errors import TensorError
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight


class TensorHeader(Protocol):
    """What a reader may know of one stored tensor before reading it: its header."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str:
        """The safetensors dtype name, e.g. "I32", "F8_E4M3"."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def numel(self) -> int: ...


class HeaderIndex(Protocol):
    """The tensors of one checkpoint by full name, headers only: what every reader is handed.

    The loader's `TensorIndex` (loading/checkpoint.py) is one; readers depend on this shape only,
    so `quant/` never imports the loader."""

    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def get(self, name: str) -> TensorHeader | None: ...

    def info(self, name: str) -> TensorHeader:
        """The header of `name`; raises TensorError naming it when it is absent."""

    def has_data(self, name: str) -> bool:
        """Present with at least one element (zero-size quantization tensors mean 'not quantized')."""


@dataclass(frozen=True)
class StoredNames:
    """Tensor names (full, e.g. 'model.layers.0.mlp.down_proj.qweight') of one stored layer."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def all(self) -> tuple[str, ...]:
        return self.required + self.optional


class QuantFormat(ABC):
    """Reads one family of quantized checkpoints. One instance per checkpoint."""

    name: ClassVar[str]
    # Tensor-name suffixes (".qweight") that only this format's quantized layers have: a checkpoint
    # holding one while declaring no quantization is refused by detection, not loaded as garbage.
    # (Unpacked codes are recognised by their dtype instead: `WeightTypeTraits.stored_dtype`.)
    marker_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        self.qconfig = qconfig
        self.index = index
        self.source = source  # where the quantization config came from, for messages
        self.notes: list[str] = []  # config/tensor disagreements found while resolving specs

    @classmethod
    def from_checkpoint(cls, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> QuantFormat:
        """Validate the config section (raise QuantConfigError naming the field) and build."""
        return cls(qconfig, index, source)

    @abstractmethod
    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        """How the layer at `prefix` is stored, decided from the tensors present (formats.md §1.3);
        None means stored unquantized as `prefix.weight`. Reads headers only, never data."""

    @abstractmethod
    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        """Names of the tensors that make up the quantized layer at `prefix`."""

    @abstractmethod
    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        """Check the shapes and dtypes of one layer's stored tensors (keyed by full name) against
        the spec and the model's [out, in] = `shape`, reading no values: the preflight passes
        data-less stand-ins built from the headers, the loader the same before reading. Raise
        TensorError naming the tensor, with the expected and the actual shape or dtype."""

    @abstractmethod
    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        """Translate the on-disk tensors of one layer (keyed by full name) into the canonical form.
        Must raise TensorError naming the tensor for any shape/dtype/value inconsistency."""

    def describe(self) -> str:
        """One line for `inspect`: format name and the headline settings."""
        return self.name

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)


@dataclass(frozen=True)
class WriteOptions:
    """What `anyquant quantize` was asked for; each writer reads the fields it understands."""

    bits: int = 4
    group_size: int = 128  # -1: per channel
    sym: bool = False
    act_order: bool = False
    block_size: tuple[int, int] = (128, 128)
    act: str | None = None  # e.g. "int8-dynamic", "int8-static", "fp8-dynamic", "fp8-static"
    # Preset name where the tool has presets (compressed-tensors: "W4A16", "FP8_BLOCK", ...).
    scheme: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FormatWriter(ABC):
    """Writes canonical weights in one on-disk format, exactly as the real tool would."""

    name: ClassVar[str]  # the --format value

    def __init__(self, options: WriteOptions) -> None:
        self.options = options

    @classmethod
    def options_for(cls, spec: QuantSpec) -> WriteOptions:
        """Options under which this writer's `spec_for` gives `spec` where the format can store it
        (`anyquant convert` configures the target this way from the source's layers). Writers whose
        options mean more override it; one that cannot store part of `spec` returns the nearest
        options it accepts, and the converter refuses per layer what then does not fit exactly."""
        act = None
        if spec.act is not None:
            kind = "int8" if spec.act.type == "int8" else "fp8"
            act = f"{kind}-{'dynamic' if spec.act.dynamic else 'static'}"
        return WriteOptions(
            bits=spec.bits,
            group_size=spec.group_size if spec.granularity == "group" else -1,
            sym=not spec.has_zero,
            act_order=spec.act_order,
            block_size=spec.block_shape if spec.granularity == "block" else (128, 128),
            act=act,
        )

    @abstractmethod
    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        """The spec to quantize this layer with, or a reason why this format cannot store it
        (the layer is then written unquantized and listed in the config's skip list)."""

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """Dtype the format stores scales in; RTN rounds scales to it before computing codes so
        that encode -> decode is exact."""
        return model_dtype

    def input_scale(self, prefix: str) -> Tensor | None:
        """Static activation scale for `prefix` (static schemes only; needs calibration data).
        The quantize command passes calibration amax through `options.extra['act_amax']`."""
        return None

    @abstractmethod
    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        """Canonical weight -> on-disk tensors keyed by full name (bias excluded: the quantize
        command writes `prefix.bias` itself)."""

    @abstractmethod
    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        """The `quantization_config` section; `skipped` lists the module prefixes left unquantized."""

    def side_files(self, skipped: list[str]) -> dict[str, dict[str, Any]]:
        """Extra JSON files some tools write next to config.json (e.g. quantize_config.json)."""
        return {}


def require_dtype(name: str, tensor: Tensor, *allowed: torch.dtype) -> None:
    if tensor.dtype not in allowed:
        want = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TensorError(name, f"dtype {str(tensor.dtype).removeprefix('torch.')}, expected {want}")


def require_shape(name: str, tensor: Tensor, shape: tuple[int, ...], why: str = "") -> None:
    if tuple(tensor.shape) != tuple(shape):
        extra = f" ({why})" if why else ""
        raise TensorError(name, f"shape {list(tensor.shape)}, expected {list(shape)}{extra}")


def require_layer_shape(
    name: str, tensor: Tensor, want: tuple[int, ...], holds: str, shape: tuple[int, int]
) -> None:
    """A stored tensor whose size follows from the model's [out, in] (from config.json)."""
    if tuple(tensor.shape) != tuple(want):
        raise TensorError(
            name,
            f"shape {list(tensor.shape)}, expected {list(want)} ({holds} for [out, in] = {list(shape)} "
            "from config.json)",
        )


def refuse_partial_layer(index: HeaderIndex, prefix: str, marker: str, companions: tuple[str, ...]) -> None:
    """A layer whose marker tensor is absent or empty but whose companions hold data, with no plain
    weight to fall back on, is broken, not skipped: say so instead of loading it as unquantized."""
    if index.has_data(f"{prefix}.weight"):
        return
    present = [s for s in companions if index.has_data(f"{prefix}.{s}")]
    if present:
        raise TensorError(
            f"{prefix}.{marker}",
            f"missing or empty while {', '.join(present)} hold data and no plain weight exists",
        )
