"""Registries: quant_method -> format reader, --format -> writer, and the kernel capability table.

Owns name lookup and kernel choice. Registration happens at each class definition; the modules
that define them are imported lazily by `_load_builtin()` so `import anyquant` stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from anyquant.errors import QuantConfigError, UnsupportedError
from anyquant.quant.spec import LayerKind, QuantSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyquant.quant.formats.base import FormatWriter, QuantFormat
    from anyquant.quant.kernels.base import LinearKernel

_FORMATS: dict[str, type[QuantFormat]] = {}
_WRITERS: dict[str, type[FormatWriter]] = {}
_KERNELS: dict[str, type[LinearKernel]] = {}

# One line per built-in module; adding a format or kernel means adding its module here.
_BUILTIN_MODULES = (
    "anyquant.quant.formats.awq",
    "anyquant.quant.formats.gptq",
    "anyquant.quant.formats.compressed_tensors",
    "anyquant.quant.formats.fp8",
    "anyquant.quant.formats.lmdeploy",
    "anyquant.quant.formats.gguf",
    "anyquant.quant.kernels.reference",
    "anyquant.quant.kernels.dense",
    "anyquant.quant.kernels.torch_cpu",
    "anyquant.quant.kernels.avx512",
    "anyquant.quant.kernels.avx512_vnni",
    "anyquant.quant.kernels.avx2",
    "anyquant.quant.kernels.avx2_a8",
    "anyquant.quant.kernels.cuda",
)
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def register_format(*quant_methods: str) -> Callable[[type[QuantFormat]], type[QuantFormat]]:
    def add(cls: type[QuantFormat]) -> type[QuantFormat]:
        for method in quant_methods:
            if method in _FORMATS:
                raise ValueError(f"quant_method {method!r} registered twice")
            _FORMATS[method] = cls
        return cls

    return add


def register_writer(cls: type[FormatWriter]) -> type[FormatWriter]:
    if cls.name in _WRITERS:
        raise ValueError(f"writer {cls.name!r} registered twice")
    _WRITERS[cls.name] = cls
    return cls


def register_kernel(cls: type[LinearKernel]) -> type[LinearKernel]:
    if cls.name in _KERNELS:
        raise ValueError(f"kernel {cls.name!r} registered twice")
    _KERNELS[cls.name] = cls
    return cls


def format_class(quant_method: str) -> type[QuantFormat]:
    _load_builtin()
    if quant_method not in _FORMATS:
        known = ", ".join(sorted(_FORMATS))
        raise QuantConfigError(f"unknown quant_method {quant_method!r}; anyquant reads: {known}")
    return _FORMATS[quant_method]


def format_classes() -> list[type[QuantFormat]]:
    """Every registered reader class once (a class may serve several quant_method names)."""
    _load_builtin()
    return list(dict.fromkeys(_FORMATS.values()))


def known_quant_methods() -> list[str]:
    _load_builtin()
    return sorted(_FORMATS)


def writer_class(name: str) -> type[FormatWriter]:
    _load_builtin()
    if name not in _WRITERS:
        raise UnsupportedError(
            f"unknown output format {name!r}; anyquant writes: {', '.join(sorted(_WRITERS))}"
        )
    return _WRITERS[name]


def writer_names() -> list[str]:
    _load_builtin()
    return sorted(_WRITERS)


def kernel_classes() -> list[type[LinearKernel]]:
    _load_builtin()
    return sorted(_KERNELS.values(), key=lambda k: (-k.priority, k.name))


@dataclass(frozen=True)
class KernelChoice:
    kernel: type[LinearKernel]
    rejected: tuple[tuple[str, str], ...]  # (kernel name, reason) for every better-ranked kernel

    @property
    def name(self) -> str:
        return self.kernel.name


def choose_kernel(
    spec: QuantSpec | None,
    kind: LayerKind,
    device: torch.device,
    shape: tuple[int, int],
    compute_dtype: torch.dtype,
    prefer: str | None = None,
) -> KernelChoice:
    """Walk the kernels by priority; the first that can run wins. `prefer` forces one by name."""
    rejected: list[tuple[str, str]] = []
    for cls in kernel_classes():
        if prefer is not None and cls.name != prefer:
            continue
        reason = cls.cannot_run(spec, kind, device, shape, compute_dtype)
        if reason is None:
            return KernelChoice(cls, tuple(rejected))
        rejected.append((cls.name, reason))
    what = spec.describe() if spec else "unquantized"
    if prefer is not None and not rejected:
        names = ", ".join(k.name for k in kernel_classes())
        raise UnsupportedError(f"unknown kernel {prefer!r}; known kernels: {names}")
    lines = "; ".join(f"{name}: {why}" for name, why in rejected)
    raise UnsupportedError(f"no kernel can run a {kind} layer {shape} ({what}) on {device}: {lines}")
