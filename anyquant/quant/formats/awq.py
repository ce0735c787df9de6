"""AWQ checkpoints (AutoAWQ GEMM/GEMV, lmdeploy `lite auto_awq`, GPTQModel AWQ export).

Owns formats.md §2: the `quant_method: "awq"` config (and legacy `quant_config.json` keys), the
GEMM layout (nibbles interleaved along N) and the GEMV layout (bitstream along K, padded group
axis), translation into the canonical uint4 group weight with zero points, and the writers
`awq` (AutoAWQ GEMM) and `awq-gemv`. Bit-level primitives live in `quant/packing.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from anyquant.errors import NumericsError, QuantConfigError, TensorError, UnsupportedError
from anyquant.quant.formats.base import (
    FormatWriter,
    HeaderIndex,
    QuantFormat,
    StoredNames,
    WriteOptions,
    refuse_partial_layer,
    require_dtype,
    require_layer_shape,
)
from anyquant.quant.packing import awq_pack, awq_unpack, pack_bits, unpack_bits
from anyquant.quant.registry import register_format, register_writer
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight, require_finite

Layout = Literal["gemm", "gemv"]

# `version` (or GPTQModel's `format`) value -> tensor layout. exllama/ipex kernels repack a GEMM
# checkpoint at load time, so their files are GEMM files (ipex: UNVERIFIED, formats.md §13).
_VERSIONS: dict[str, Layout] = {"gemm": "gemm", "exllama": "gemm", "ipex": "gemm", "gemv": "gemv"}
_REJECTED_VERSIONS = {
    "gemv_fast": "a kernel-specific interleaved layout (AutoAWQ GEMVFast)",
    "marlin": "the Marlin kernel's tiled layout",
    "llm-awq": "the llm-awq kernel layout",
}
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUFFIXES = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class AwqConfig:
    """The validated quantization section."""

    group_size: int  # -1: one group spanning K (per-channel scales)
    zero_point: bool
    version: str  # as written, lower-case
    layout: Layout
    skip: tuple[str, ...]  # modules_to_not_convert (AutoAWQ matches by substring)


def _pick(qc: dict[str, Any], keys: tuple[str, ...], default: Any, source: str) -> Any:
    """Value of the first present key; modern and legacy spellings must agree when both exist."""
    found = [(k, qc[k]) for k in keys if qc.get(k) is not None]
    if not found:
        return default
    key, value = found[0]
    for other, v in found[1:]:
        if _norm(v) != _norm(value):
            raise QuantConfigError(f"{source}: '{key}' = {value!r} but '{other}' = {v!r}; they must agree")
    return value


def _norm(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _int_field(value: Any, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantConfigError(f"{source}: '{field}' must be an integer, got {value!r}")
    return value


def parse_awq_config(qc: dict[str, Any], source: str) -> AwqConfig:
    """Validate an AWQ section (modern or legacy `quant_config.json` spelling)."""
    bits = _int_field(_pick(qc, ("bits", "w_bit"), 4, source), "bits", source)
    if bits != 4:
        raise QuantConfigError(f"{source}: 'bits' = {bits}; AWQ checkpoints are 4-bit only")
    group = _int_field(_pick(qc, ("group_size", "q_group_size"), 128, source), "group_size", source)
    if group != -1 and (group <= 0 or group % 8):
        raise QuantConfigError(
            f"{source}: 'group_size' = {group}; anyquant reads -1 (per channel) or a positive multiple of 8"
        )
    zero_point = _pick(qc, ("zero_point",), True, source)
    if not isinstance(zero_point, bool):
        raise QuantConfigError(f"{source}: 'zero_point' must be true or false, got {zero_point!r}")
    backend = qc.get("backend")
    if backend is not None and str(backend).lower() != "autoawq":
        why = _REJECTED_VERSIONS.get(str(backend).lower(), "an unknown packing")
        raise QuantConfigError(
            f"{source}: 'backend' = {backend!r} uses {why}; anyquant reads backend 'autoawq' (the default)"
        )
    raw = _pick(qc, ("version", "format"), "gemm", source)
    if not isinstance(raw, str):
        raise QuantConfigError(f"{source}: 'version' must be a string, got {raw!r}")
    version = raw.lower()
    if version in _REJECTED_VERSIONS:
        raise QuantConfigError(
            f"{source}: 'version' = {raw!r} uses {_REJECTED_VERSIONS[version]}, which anyquant does not "
            f"read; re-export with version 'gemm'"
        )
    if version not in _VERSIONS:
        raise QuantConfigError(
            f"{source}: 'version' = {raw!r}; expected one of {', '.join(sorted(_VERSIONS))}"
        )
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise QuantConfigError(f"{source}: 'modules_to_not_convert' must be a list of strings, got {skip!r}")
    return AwqConfig(group, zero_point, version, _VERSIONS[version], tuple(skip))


def gemv_zeros_width(num_groups: int, group_size: int) -> int:
    """Words per row of a GEMV `qzeros` (AutoAWQ pads the group axis, formats.md §2.3)."""
    multiple = {64: 2, 32: 4}.get(group_size, 1)
    words = -(-num_groups // 8)
    return -(-words // multiple) * multiple


@dataclass(frozen=True)
class Geometry:
    """Logical sizes of one stored AWQ layer, derived from (and checked against) tensor shapes."""

    out_features: int  # N
    in_features: int  # K
    group: int  # G actually used (K for group_size -1)
    num_groups: int


def _expect(name: str, shape: tuple[int, ...], want: tuple[int, ...], why: str) -> None:
    if tuple(shape) != want:
        raise TensorError(name, f"shape {list(shape)}, expected {list(want)} ({why})")


def awq_geometry(prefix: str, shapes: dict[str, tuple[int, ...]], config: AwqConfig) -> Geometry:
    """Check the shapes of `prefix.{qweight,qzeros,scales}` (keyed by suffix) against the config."""
    for suffix in _SUFFIXES:
        if len(shapes[suffix]) != 2:
            raise TensorError(f"{prefix}.{suffix}", f"has {len(shapes[suffix])} dimensions, expected 2")
    qweight, scales = shapes["qweight"], shapes["scales"]
    if config.layout == "gemm":
        # qweight [K, N/8], qzeros [ng, N/8], scales [ng, N]
        k, n, ng = qweight[0], scales[1], scales[0]
        if n % 8:
            raise TensorError(
                f"{prefix}.scales", f"N = {n} out_features is not a multiple of 8 (AWQ packs 8 per word)"
            )
        _expect(f"{prefix}.qweight", qweight, (k, n // 8), f"[K, N/8] for N = {n} from scales")
    else:
        # qweight [N, K/8], qzeros [N, Zw], scales [N, 8*Zw]
        n, k, ng = qweight[0], qweight[1] * 8, 0
    group = config.group_size if config.group_size != -1 else k
    if group <= 0 or k % group:
        raise TensorError(
            f"{prefix}.qweight",
            f"in_features K = {k} is not a multiple of group_size {config.group_size} (AWQ needs whole groups)",
        )
    want_groups = k // group
    if config.layout == "gemm":
        if ng != want_groups:
            implied = f"group size {k // ng}" if ng and k % ng == 0 else "no whole group size"
            raise TensorError(
                f"{prefix}.scales",
                f"shape {list(scales)} has {ng} groups for K = {k}, i.e. {implied}, but the config's "
                f"group_size {config.group_size} needs {want_groups}",
            )
        _expect(f"{prefix}.qzeros", shapes["qzeros"], (ng, n // 8), "[K/G, N/8]")
    else:
        ng = want_groups
        zw = gemv_zeros_width(ng, group)
        _expect(f"{prefix}.qzeros", shapes["qzeros"], (n, zw), f"[N, {zw}] for {ng} groups of {group}")
        _expect(f"{prefix}.scales", scales, (n, 8 * zw), f"[N, 8*{zw}], padded group axis")
    return Geometry(n, k, group, ng)


def awq_spec(config: AwqConfig, geometry: Geometry) -> QuantSpec:
    extra = (("format", f"awq {config.version}"),)
    if config.group_size == -1:
        return QuantSpec("uint4", "channel", has_zero=True, extra=extra)
    return QuantSpec("uint4", "group", group_size=config.group_size, has_zero=True, extra=extra)


def _matches_skip(prefix: str, skip: tuple[str, ...]) -> str | None:
    # AutoAWQ and lmdeploy skip a module when an entry is a substring of its dotted name.
    return next((entry for entry in skip if entry in prefix), None)


@register_format("awq")
class AwqFormat(QuantFormat):
    """Reader for `quant_method: "awq"` checkpoints (GEMM and GEMV layouts)."""

    name = "awq"
    marker_suffixes = (".qweight", ".qzeros")

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        self.config = parse_awq_config(qconfig, source)

    def describe(self) -> str:
        c = self.config
        group = "per-channel" if c.group_size == -1 else f"group {c.group_size}"
        layout = "" if c.version == c.layout else f" ({c.layout} layout)"
        return f"awq {c.version}{layout}, 4-bit, {group}, zero points"

    def _shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for suffix in _SUFFIXES:
            info = self.index.get(f"{prefix}.{suffix}")
            if info is None:
                raise self._missing(prefix, suffix)
            shapes[suffix] = info.shape
        return shapes

    def _missing(self, prefix: str, suffix: str) -> Exception:
        if suffix == "qzeros" and not self.config.zero_point:
            # formats.md §2.1: no producer writes zero_point false without qzeros (implied zero 8 UNVERIFIED).
            return UnsupportedError(
                f"{prefix}: AWQ layer without qzeros (zero_point false); no known producer writes this, "
                "so the implied zero point is unverified and anyquant refuses to guess it"
            )
        return TensorError(f"{prefix}.{suffix}", "missing; an AWQ layer needs qweight, qzeros and scales")

    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        listed = _matches_skip(prefix, self.config.skip)
        if not self.index.has_data(f"{prefix}.qweight"):
            refuse_partial_layer(self.index, prefix, "qweight", ("qzeros", "scales"))
            if listed is None and kind in ("linear", "experts"):
                self.note(f"{prefix} is stored unquantized but modules_to_not_convert does not list it")
            return None
        if listed is not None:
            self.note(
                f"{prefix} is quantized although modules_to_not_convert entry {listed!r} matches it; "
                "using the tensors (formats.md §1.3)"
            )
        return awq_spec(self.config, awq_geometry(prefix, self._shapes(prefix), self.config))

    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        return StoredNames(tuple(f"{prefix}.{s}" for s in _SUFFIXES))

    def _tensors(self, prefix: str, stored: Mapping[str, Tensor]) -> dict[str, Tensor]:
        tensors = {}
        for suffix in _SUFFIXES:
            name = f"{prefix}.{suffix}"
            if name not in stored:
                raise self._missing(prefix, suffix)
            tensors[suffix] = stored[name]
        require_dtype(f"{prefix}.qweight", tensors["qweight"], torch.int32)
        require_dtype(f"{prefix}.qzeros", tensors["qzeros"], torch.int32)
        require_dtype(f"{prefix}.scales", tensors["scales"], *_SCALE_DTYPES)
        return tensors

    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        tensors = self._tensors(prefix, stored)
        geo = awq_geometry(prefix, {s: tuple(t.shape) for s, t in tensors.items()}, self.config)
        # qzeros and scales follow qweight (geometry); qweight follows the model.
        if (geo.out_features, geo.in_features) != shape:
            n, k = shape
            gemm = self.config.layout == "gemm"
            want = (k, -(-n // 8)) if gemm else (n, -(-k // 8))
            holds = "[K, N/8] words" if gemm else "[N, K/8] words"
            require_layer_shape(f"{prefix}.qweight", tensors["qweight"], want, holds, shape)
            raise TensorError(
                f"{prefix}.scales",
                f"shape {list(tensors['scales'].shape)} implies [out, in] = "
                f"{[geo.out_features, geo.in_features]}, expected {list(shape)} (from config.json)",
            )

    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        tensors = self._tensors(prefix, stored)
        geo = awq_geometry(prefix, {s: tuple(t.shape) for s, t in tensors.items()}, self.config)
        want = awq_spec(self.config, geo)
        if spec != want:
            raise TensorError(
                f"{prefix}.scales", f"tensors hold {want.describe()}, not the requested {spec.describe()}"
            )
        if self.config.layout == "gemm":
            codes, zeros, scales = _unpack_gemm(tensors, geo)
        else:
            codes, zeros, scales = _unpack_gemv(tensors, geo)
        require_finite(f"{prefix}.scales", scales)
        if want.granularity == "channel":
            zeros, scales = zeros[:, 0], scales[:, 0]
        weight = QuantWeight(
            want, (geo.out_features, geo.in_features), codes, scales.contiguous(), zeros.contiguous()
        )
        return weight.validate(prefix)


def _unpack_gemm(t: dict[str, Tensor], geo: Geometry) -> tuple[Tensor, Tensor, Tensor]:
    n = geo.out_features
    codes = awq_unpack(t["qweight"], n).T.contiguous()  # [K, N] -> [N, K]
    zeros = awq_unpack(t["qzeros"], n).T.to(torch.int32)  # [ng, N] -> [N, ng]
    scales = t["scales"].float().T  # [ng, N] -> [N, ng]
    return codes, zeros, scales


def _unpack_gemv(t: dict[str, Tensor], geo: Geometry) -> tuple[Tensor, Tensor, Tensor]:
    codes = unpack_bits(t["qweight"], 4, geo.in_features, dim=1)  # [N, K]
    zeros = unpack_bits(t["qzeros"], 4, geo.num_groups, dim=1).to(torch.int32)  # [N, ng]
    scales = t["scales"][:, : geo.num_groups].float()  # [N, ng]; columns beyond ng are padding
    return codes, zeros, scales


def to_float16_scales(name: str, scales: Tensor) -> Tensor:
    """fp32 canonical scales -> F16 as the producers store them; refuse overflow and flush-to-zero."""
    half = scales.to(torch.float16)
    lost = (~torch.isfinite(half)) | ((half == 0) & (scales != 0))
    if bool(lost.any()):
        raise NumericsError(
            f"{name}: {int(lost.sum())} scales do not fit in float16 (overflow or flush to zero); "
            "this format stores F16 scales"
        )
    return half


def _explicit_zeros(weight: QuantWeight) -> Tensor:
    """Zero points as stored by AWQ: symmetric weights get their implicit zero written out."""
    if weight.zero is not None:
        return weight.zero
    return torch.full_like(weight.scale, weight.spec.implicit_zero, dtype=torch.int32)


class _AwqWriterBase(FormatWriter):
    """Shared checks of the AWQ writers: 4-bit, zero points, no act-order."""

    version: str

    def __init__(self, options: WriteOptions) -> None:
        super().__init__(options)
        if options.bits != 4:
            raise UnsupportedError(f"--format {self.name} writes 4-bit weights only, not {options.bits}-bit")
        if options.sym:
            raise UnsupportedError(
                f"--format {self.name} stores zero points (AutoAWQ zero_point=True); drop --sym"
            )
        if options.act_order:
            raise UnsupportedError(f"--format {self.name} has no act-order (no g_idx); drop --act-order")
        g = options.group_size
        if g != -1 and (g <= 0 or g % 8):
            raise UnsupportedError(
                f"--format {self.name}: group size {g}; use -1 or a positive multiple of 8"
            )
        self._defaults: set[str] = set()  # prefixes AutoAWQ never quantizes (lm_head, embeddings)

    @classmethod
    def options_for(cls, spec: QuantSpec) -> WriteOptions:
        # AWQ files always hold 4-bit codes with zero points and no act-order; a symmetric layer is
        # stored with its implicit zero written out.
        return replace(super().options_for(spec), bits=4, sym=False, act_order=False, act=None)

    def _spec(self) -> QuantSpec:
        g = self.options.group_size
        if g == -1:
            return QuantSpec("uint4", "channel", has_zero=True)
        return QuantSpec("uint4", "group", group_size=g, has_zero=True)

    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        if kind in ("lm_head", "embedding"):
            self._defaults.add(prefix)
            return f"AutoAWQ leaves the {kind} unquantized"
        n, k = shape
        g = self.options.group_size
        if g != -1 and k % g:
            return f"in_features {k} is not a multiple of the group size {g}"
        return self._layout_reason(n, k) or self._spec()

    def _layout_reason(self, n: int, k: int) -> str | None:
        return None

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float16  # AutoAWQ casts scales to fp16 whatever the model dtype

    def _check(self, prefix: str, weight: QuantWeight) -> tuple[int, int, int]:
        spec = weight.spec
        if spec.weight != "uint4" or spec.act_order or spec.act is not None or weight.data.dim() != 2:
            raise UnsupportedError(f"{prefix}: --format {self.name} cannot store {spec.describe()}")
        n, k = weight.shape
        group = spec.group_size if spec.granularity == "group" else k
        if group <= 0 or k % group:
            raise UnsupportedError(f"{prefix}: in_features {k} is not a multiple of the group size {group}")
        reason = self._layout_reason(n, k)
        if reason:
            raise UnsupportedError(f"{prefix}: {reason}")
        return n, k, group

    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        listed = [p for p in skipped if p not in self._defaults]
        return {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": self.options.group_size,
            "bits": 4,
            "version": self.version,
            "modules_to_not_convert": listed or None,
        }


@register_writer
class AwqGemmWriter(_AwqWriterBase):
    """AutoAWQ GEMM files: 4-bit, zero points, F16 scales, nibbles interleaved along N."""

    name = "awq"
    version = "gemm"

    def _layout_reason(self, n: int, k: int) -> str | None:
        return f"out_features {n} is not a multiple of 8 (AWQ packs 8 columns per word)" if n % 8 else None

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        n, _, _ = self._check(prefix, weight)
        zeros = _explicit_zeros(weight).reshape(n, -1)  # [N, ng]
        scales = weight.scale.reshape(n, -1)  # [N, ng]
        return {
            f"{prefix}.qweight": awq_pack(weight.data.T.contiguous()),  # [K, N/8]
            f"{prefix}.qzeros": awq_pack(zeros.T.contiguous()),  # [ng, N/8]
            f"{prefix}.scales": to_float16_scales(f"{prefix}.scales", scales.T.contiguous()),  # [ng, N]
        }


@register_writer
class AwqGemvWriter(_AwqWriterBase):
    """AutoAWQ GEMV files: codes packed along K per output row, group axis padded."""

    name = "awq-gemv"
    version = "gemv"

    def _layout_reason(self, n: int, k: int) -> str | None:
        g = self.options.group_size if self.options.group_size != -1 else k
        if k % 32:
            return f"in_features {k} is not a multiple of 32 (AutoAWQ GEMV packs 32 inputs per 4 words)"
        if g not in (32, 64) and g < 128:
            return f"AutoAWQ GEMV supports group sizes 32, 64 and >= 128, not {g}"
        return None

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        n, k, group = self._check(prefix, weight)
        ng = k // group
        zw = gemv_zeros_width(ng, group)
        zeros = torch.zeros(n, 8 * zw, dtype=torch.int32)
        zeros[:, :ng] = _explicit_zeros(weight).reshape(n, ng)
        scales = torch.zeros(n, 8 * zw, dtype=torch.float32)
        scales[:, :ng] = weight.scale.reshape(n, ng)
        return {
            f"{prefix}.qweight": pack_bits(weight.data, 4, dim=1),  # [N, K/8]
            f"{prefix}.qzeros": pack_bits(zeros, 4, dim=1),  # [N, Zw]
            f"{prefix}.scales": to_float16_scales(f"{prefix}.scales", scales),  # [N, 8*Zw]
        }
