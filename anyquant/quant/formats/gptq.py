"""GPTQ checkpoints (AutoGPTQ, GPTQModel, HF/optimum): config, v1/v2 zero points, g_idx.

Owns formats.md §3: the `quant_method: "gptq"` section (and older quantize_config.json without
it), GPTQModel `dynamic` per-module overrides, the bitstream layouts for 2/3/4/8 bits, the v1
"zero minus one" convention decoded word-level, `g_idx` validation and act-order detection, and
the writers `gptq` (v1, as GPTQModel saves) and `gptq-v2`. Bit primitives: `quant/packing.py`.
`group_size: -1` (one group spanning K) maps to canonical "channel" granularity: scales [N].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from anyquant import __version__
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
from anyquant.quant.packing import pack_bits, packed_len, unpack_bits
from anyquant.quant.registry import register_format, register_writer
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight, require_finite
from anyquant.quant.weight_types import canonical_uint

_BITS = (2, 3, 4, 8)
# v1 files store zero-1; GPTQModel subtracts this constant from each packed word (mod 2^32), so
# the decoder adds it back word-level (formats.md §3.3). 3-bit is handled per field instead.
_V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
_MASK32 = 0xFFFFFFFF
_FORMATS = {"gptq": False, "gptq_v2": True}  # checkpoint format -> zero points stored as-is
_REJECTED_FORMATS = ("marlin", "bitblas", "gptq_p", "qqq")
_OVERRIDE_KEYS = ("bits", "group_size", "sym", "desc_act")
# Producers whose v1 words are "v2 word minus constant", where a stored field of 2^b-1 is legal.
_WORD_LEVEL_PRODUCERS = ("gptqmodel:", "anyquant:")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUFFIXES = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class LayerConfig:
    """Settings that decide one module's layout (top-level, or a `dynamic` override)."""

    bits: int
    group_size: int  # -1: per channel
    sym: bool
    desc_act: bool


@dataclass(frozen=True)
class DynamicRule:
    pattern: str  # as written, including any "+:" / "-:" prefix
    regex: re.Pattern[str]
    override: LayerConfig | None  # None: "-:" rule, matching modules stay unquantized


@dataclass(frozen=True)
class GptqConfig:
    base: LayerConfig
    v2: bool  # checkpoint format gptq_v2: zero points stored as-is
    lm_head: bool
    dynamic: tuple[DynamicRule, ...]
    word_level: bool  # written by GPTQModel (or anyquant): no corrupt v1 words to expect

    def layer(self, prefix: str) -> LayerConfig | None:
        """Settings for the module `prefix`; None when a `-:` rule excludes it. First match wins."""
        for rule in self.dynamic:
            if rule.regex.match(prefix):
                return rule.override
        return self.base


def _field(qc: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = qc.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QuantConfigError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _layer_config(qc: dict[str, Any], base: LayerConfig | None, where: str) -> LayerConfig:
    fallback = base or LayerConfig(4, 128, True, False)
    bits = _field(qc, "bits", int, fallback.bits, where)
    if bits not in _BITS:
        raise QuantConfigError(f"{where}: 'bits' = {bits}; GPTQ checkpoints use 2, 3, 4 or 8 bits")
    group = _field(qc, "group_size", int, fallback.group_size, where)
    if group != -1 and (group <= 0 or group % 8):
        raise QuantConfigError(
            f"{where}: 'group_size' = {group}; anyquant reads -1 (per channel) or a positive multiple of 8"
        )
    sym = _field(qc, "sym", bool, fallback.sym, where)
    desc_act = _field(qc, "desc_act", bool, fallback.desc_act, where)
    return LayerConfig(bits, group, sym, desc_act)


def _checkpoint_format(qc: dict[str, Any], source: str) -> bool:
    values = {k: qc[k] for k in ("format", "checkpoint_format") if qc.get(k) is not None}
    if len({str(v).lower() for v in values.values()}) > 1:
        raise QuantConfigError(
            f"{source}: 'format' = {values['format']!r} but 'checkpoint_format' = "
            f"{values['checkpoint_format']!r}; they must agree"
        )
    raw = next(iter(values.values()), "gptq")
    fmt = str(raw).lower()
    field = next(iter(values), "format")
    if fmt in _REJECTED_FORMATS:
        raise QuantConfigError(
            f"{source}: '{field}' = {raw!r} is a kernel-specific repacked layout anyquant does not read; "
            "use a checkpoint saved with format 'gptq' or 'gptq_v2'"
        )
    if fmt not in _FORMATS:
        raise QuantConfigError(f"{source}: '{field}' = {raw!r}; expected 'gptq' (v1) or 'gptq_v2'")
    if qc.get("is_marlin_format"):
        raise QuantConfigError(
            f"{source}: 'is_marlin_format' is true (AutoGPTQ Marlin repack); anyquant reads the plain GPTQ layout"
        )
    return _FORMATS[fmt]


def _check_pack_dtype(value: Any, where: str) -> None:
    # pack_dtype int8/16/64 changes the word width; no public checkpoint is known to use it.
    if value is not None and str(value).removeprefix("torch.") != "int32":
        raise QuantConfigError(f"{where}: 'pack_dtype' = {value!r}; anyquant reads int32-packed GPTQ only")


def _dynamic_rules(raw: Any, base: LayerConfig, source: str, notes: list[str]) -> tuple[DynamicRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise QuantConfigError(f"{source}: 'dynamic' must be an object of pattern -> overrides, got {raw!r}")
    rules = []
    for key, value in raw.items():
        where = f"{source}: dynamic[{key!r}]"
        negative = key.startswith("-:")
        body = key[2:] if negative or key.startswith("+:") else key
        try:
            regex = re.compile(body)
        except re.error as exc:
            raise QuantConfigError(f"{where}: not a valid regular expression: {exc}") from exc
        if negative:
            rules.append(DynamicRule(key, regex, None))
            continue
        if not isinstance(value, dict):
            raise QuantConfigError(f"{where}: overrides must be an object, got {value!r}")
        _check_pack_dtype(value.get("pack_dtype"), where)
        unknown = sorted(set(value) - {*_OVERRIDE_KEYS, "pack_dtype"})
        if unknown:
            notes.append(
                f"{where}: ignoring override keys {unknown} (only {list(_OVERRIDE_KEYS)} change the layout)"
            )
        rules.append(DynamicRule(key, regex, _layer_config(value, base, where)))
    return tuple(rules)


def parse_gptq_config(qc: dict[str, Any], source: str, notes: list[str]) -> GptqConfig:
    """Validate a GPTQ section; disagreements worth a warning are appended to `notes`."""
    if "sym" not in qc:
        notes.append(f"{source}: no 'sym' field; assuming true like GPTQModel (zero points are read anyway)")
    base = _layer_config(qc, None, source)
    v2 = _checkpoint_format(qc, source)
    _check_pack_dtype(qc.get("pack_dtype"), source)
    lm_head = _field(qc, "lm_head", bool, False, source)
    meta = qc.get("meta")
    quantizer = (meta.get("quantizer") if isinstance(meta, dict) else None) or []
    tools = [quantizer] if isinstance(quantizer, str) else [str(q) for q in quantizer]
    word_level = any(t.lower().startswith(_WORD_LEVEL_PRODUCERS) for t in tools)
    dynamic = _dynamic_rules(qc.get("dynamic"), base, source, notes)
    return GptqConfig(base, v2, lm_head, dynamic, word_level)


@dataclass(frozen=True)
class Geometry:
    """Logical sizes of one stored GPTQ layer, derived from (and checked against) tensor shapes."""

    out_features: int  # N
    in_features: int  # K
    num_groups: int


def gptq_geometry(prefix: str, shapes: dict[str, tuple[int, ...]], layer: LayerConfig) -> Geometry:
    """Check `prefix.{qweight,qzeros,scales,g_idx?}` shapes (keyed by suffix) against the settings."""
    b = layer.bits
    for suffix, shape in shapes.items():
        want_dims = 1 if suffix == "g_idx" else 2
        if len(shape) != want_dims:
            raise TensorError(f"{prefix}.{suffix}", f"has {len(shape)} dimensions, expected {want_dims}")
    rows, n = shapes["qweight"]
    if "g_idx" in shapes:
        k = shapes["g_idx"][0]
        if rows != packed_len(k, b):
            raise TensorError(
                f"{prefix}.qweight",
                f"shape {list(shapes['qweight'])}: {rows} rows, but K = {k} (from g_idx) at {b} bits needs "
                f"{packed_len(k, b)}; do 'bits' (or a 'dynamic' override) match this module?",
            )
    else:
        # Without g_idx K is only known up to the padding of the last word; take the full words.
        k = rows * 32 // b
    group = layer.group_size if layer.group_size != -1 else max(k, 1)
    ng = -(-k // group)
    scales = shapes["scales"]
    if scales != (ng, n):
        implied = f" (i.e. group size ~{k // scales[0]})" if scales[0] else ""
        raise TensorError(
            f"{prefix}.scales",
            f"shape {list(scales)}, expected [{ng}, {n}] for K = {k}, N = {n}, group_size "
            f"{layer.group_size}{implied}",
        )
    want_zeros = (ng, packed_len(n, b))
    if shapes["qzeros"] != want_zeros:
        raise TensorError(
            f"{prefix}.qzeros",
            f"shape {list(shapes['qzeros'])}, expected {list(want_zeros)} ([groups, ceil(N*{b}/32)]); "
            f"does 'bits' = {b} match this module?",
        )
    return Geometry(n, k, ng)


def gptq_spec(layer: LayerConfig, act_order: bool, v2: bool) -> QuantSpec:
    extra = (("format", "gptq_v2" if v2 else "gptq v1"),)
    weight = canonical_uint(layer.bits)
    if layer.group_size == -1:
        return QuantSpec(weight, "channel", has_zero=not layer.sym, extra=extra)
    return QuantSpec(
        weight,
        "group",
        group_size=layer.group_size,
        has_zero=not layer.sym,
        act_order=act_order,
        extra=extra,
    )


def _u32(words: Tensor) -> Tensor:
    return words.to(torch.int64) & _MASK32


def _to_i32(values: Tensor) -> Tensor:
    values = values & _MASK32
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def decode_zeros(qzeros: Tensor, bits: int, n: int, v2: bool) -> Tensor:
    """qzeros [ng, ceil(N*b/32)] -> true zero points [ng, N] int32 (formats.md §3.3)."""
    if v2:
        return unpack_bits(qzeros, bits, n, dim=1).to(torch.int32)
    if bits == 3:
        return ((unpack_bits(qzeros, 3, n, dim=1).to(torch.int32) + 1) & 7).to(torch.int32)
    words = _to_i32(_u32(qzeros) + _V1_WORD_OFFSET[bits])
    return unpack_bits(words, bits, n, dim=1).to(torch.int32)


def encode_zeros(zeros: Tensor, bits: int, v2: bool) -> Tensor:
    """True zero points [ng, N] -> qzeros words, v1 written like GPTQModel (word-level subtract)."""
    if v2:
        return pack_bits(zeros, bits, dim=1)
    if bits == 3:
        return pack_bits((zeros.to(torch.int64) - 1) & 7, 3, dim=1)
    return _to_i32(_u32(pack_bits(zeros, bits, dim=1)) - _V1_WORD_OFFSET[bits])


@register_format("gptq")
class GptqFormat(QuantFormat):
    """Reader for GPTQ checkpoints (v1 and v2 zero points, act-order, dynamic overrides)."""

    name = "gptq"
    marker_suffixes = (".qweight", ".qzeros")

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        notes: list[str] = []
        self.config = parse_gptq_config(qconfig, source, notes)
        for message in notes:
            self.note(message)

    def describe(self) -> str:
        c, b = self.config, self.config.base
        group = "per-channel" if b.group_size == -1 else f"group {b.group_size}"
        parts = [
            f"gptq {'v2' if c.v2 else 'v1'}",
            f"{b.bits}-bit",
            group,
            "sym" if b.sym else "asym",
        ]
        if b.desc_act:
            parts.append("desc_act")
        if c.dynamic:
            parts.append(f"{len(c.dynamic)} dynamic rules")
        if c.lm_head:
            parts.append("lm_head quantized")
        return ", ".join(parts)

    # -- specs -------------------------------------------------------------------------------
    def _shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for suffix in _SUFFIXES:
            info = self.index.get(f"{prefix}.{suffix}")
            if info is None:
                raise TensorError(
                    f"{prefix}.{suffix}", "missing; a GPTQ layer needs qweight, qzeros and scales"
                )
            shapes[suffix] = info.shape
        g_idx = self.index.get(f"{prefix}.g_idx")
        if g_idx is not None and g_idx.numel:  # an empty g_idx carries nothing: k // G applies
            shapes["g_idx"] = g_idx.shape
        return shapes

    def _quantized_layer(self, prefix: str) -> LayerConfig:
        """Settings of a module whose tensors say it is quantized."""
        layer = self.config.layer(prefix)
        if layer is None:
            rule = next(r.pattern for r in self.config.dynamic if r.regex.match(prefix))
            self.note(
                f"{prefix} is quantized although dynamic rule {rule!r} excludes it; "
                "using the top-level settings and the tensors (formats.md §1.3)"
            )
            return self.config.base
        return layer

    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        quantized = self.index.has_data(f"{prefix}.qweight")
        if kind == "lm_head" and quantized != self.config.lm_head:
            state = "quantized" if quantized else "unquantized"
            self.note(f"{prefix} is stored {state} but the config says lm_head: {self.config.lm_head}")
        if not quantized:
            refuse_partial_layer(self.index, prefix, "qweight", ("qzeros", "scales"))
            return None
        layer = self._quantized_layer(prefix)
        self._geometry(prefix, self._shapes(prefix), layer)
        act_order = layer.desc_act and self.index.has_data(f"{prefix}.g_idx")
        return gptq_spec(layer, act_order, self.config.v2)

    def _geometry(self, prefix: str, shapes: dict[str, tuple[int, ...]], layer: LayerConfig) -> Geometry:
        geo = gptq_geometry(prefix, shapes, layer)
        if layer.group_size != -1 and geo.in_features and geo.in_features % layer.group_size:
            # Allowed (the last group is short) but unusual enough to mention.
            self.note(f"{prefix}: K = {geo.in_features} is not a multiple of group_size {layer.group_size}")
        return geo

    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        return StoredNames(tuple(f"{prefix}.{s}" for s in _SUFFIXES), (f"{prefix}.g_idx",))

    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        t = self._tensors(prefix, stored)
        layer = LayerConfig(spec.bits, spec.group_size if spec.granularity == "group" else -1, True, False)
        gptq_geometry(prefix, {s: tuple(x.shape) for s, x in t.items()}, layer)
        # scales and qzeros follow qweight (geometry); qweight and g_idx follow the model.
        n, k = shape
        b = spec.bits
        want = (packed_len(k, b), n)
        require_layer_shape(f"{prefix}.qweight", t["qweight"], want, f"[ceil(K*{b}/32), N] words", shape)
        if "g_idx" in t:
            require_layer_shape(f"{prefix}.g_idx", t["g_idx"], (k,), "[K]", shape)

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        """Canonical weight of one layer. The returned spec is what the tensors prove: act_order
        follows g_idx (trivial -> False), and a `sym` hint contradicted by qzeros gains zeros."""
        t = self._tensors(prefix, stored)
        if not spec.is_uint or spec.bits not in _BITS:
            raise UnsupportedError(f"{prefix}: GPTQ stores uint2/3/4/8 codes, not {spec.describe()}")
        layer = LayerConfig(spec.bits, spec.group_size if spec.granularity == "group" else -1, True, False)
        geo = self._geometry(prefix, {s: tuple(x.shape) for s, x in t.items()}, layer)
        n, k, b = geo.out_features, geo.in_features, spec.bits
        codes = unpack_bits(t["qweight"], b, k, dim=0).T.contiguous()  # [K, N] -> [N, K]
        self._check_v1_fields(prefix, t["qzeros"], b, n)
        zeros = decode_zeros(t["qzeros"], b, n, self.config.v2).T.contiguous()  # [ng, N] -> [N, ng]
        scales = t["scales"].float().T.contiguous()  # [ng, N] -> [N, ng]
        require_finite(f"{prefix}.scales", scales)
        group_index = self._group_index(prefix, t.get("g_idx"), k, spec, geo.num_groups)
        has_zero = self._has_zero(prefix, spec, zeros)
        final = replace(spec, has_zero=has_zero, act_order=group_index is not None)
        if final.granularity == "channel":
            zeros, scales = zeros[:, 0], scales[:, 0]
        weight = QuantWeight(final, (n, k), codes, scales, zeros if has_zero else None, group_index)
        return weight.validate(prefix)

    def _tensors(self, prefix: str, stored: Mapping[str, Tensor]) -> dict[str, Tensor]:
        t = {}
        for suffix in _SUFFIXES:
            name = f"{prefix}.{suffix}"
            if name not in stored:
                raise TensorError(name, "missing; a GPTQ layer needs qweight, qzeros and scales")
            t[suffix] = stored[name]
        require_dtype(f"{prefix}.qweight", t["qweight"], torch.int32)
        require_dtype(f"{prefix}.qzeros", t["qzeros"], torch.int32)
        require_dtype(f"{prefix}.scales", t["scales"], *_SCALE_DTYPES)
        g_idx = stored.get(f"{prefix}.g_idx")
        if g_idx is not None and g_idx.numel():
            require_dtype(f"{prefix}.g_idx", g_idx, torch.int32, torch.int64)
            t["g_idx"] = g_idx
        return t

    def _check_v1_fields(self, prefix: str, qzeros: Tensor, bits: int, n: int) -> None:
        # AutoGPTQ writes a true zero of 0 as -1 OR-ed into the word, which also sets every higher
        # field: such words cannot be decoded (formats.md §3.3, §11.3).
        if self.config.v2 or self.config.word_level or not qzeros.numel():
            return
        fields = unpack_bits(qzeros, bits, n, dim=1)
        if bool((fields == (1 << bits) - 1).any()):
            self.note(
                f"{prefix}.qzeros: v1 zero-point fields equal {(1 << bits) - 1} (a true zero point of 0) in a "
                "file not written by GPTQModel; AutoGPTQ corrupts such words, so this layer may decode wrongly"
            )

    def _group_index(
        self, prefix: str, g_idx: Tensor | None, k: int, spec: QuantSpec, ng: int
    ) -> Tensor | None:
        """Validated g_idx, or None when absent or trivial (k // G)."""
        if g_idx is None or g_idx.numel() == 0:
            return None
        name = f"{prefix}.g_idx"
        gi = g_idx.to(torch.int64)
        if int(gi.min()) < 0 or int(gi.max()) >= ng:
            raise TensorError(name, f"values in [{int(gi.min())}, {int(gi.max())}], expected [0, {ng})")
        group = spec.group_size if spec.granularity == "group" else k
        if bool((gi == torch.arange(k) // group).all()):
            return None
        if k % group == 0:
            counts = torch.bincount(gi, minlength=ng)
            if bool((counts != group).any()):
                g = int(torch.nonzero(counts != group)[0])
                raise TensorError(
                    name,
                    f"group {g} has {int(counts[g])} members, expected {group} in every group "
                    "(a zero-filled or corrupt g_idx?)",
                )
        if not spec.act_order:
            self.note(f"{name} is a real act-order permutation although desc_act is false; using it")
        return gi.to(torch.int32)

    def _has_zero(self, prefix: str, spec: QuantSpec, zeros: Tensor) -> bool:
        if spec.has_zero:
            return True
        if bool((zeros == spec.implicit_zero).all()):
            return False
        self.note(
            f"{prefix}.qzeros: sym is true but zero points are not all {spec.implicit_zero}; "
            "trusting the tensor (layer decoded with zero points)"
        )
        return True


# -- writers ---------------------------------------------------------------------------------
@register_writer
class GptqWriter(FormatWriter):
    """GPTQ v1 files as GPTQModel 7 saves them: F16 scales, g_idx always, word-level v1 zeros."""

    name = "gptq"
    v2 = False

    def __init__(self, options: WriteOptions) -> None:
        super().__init__(options)
        if options.bits not in _BITS:
            raise UnsupportedError(f"--format {self.name} writes 2, 3, 4 or 8 bits, not {options.bits}")
        g = options.group_size
        if g != -1 and (g <= 0 or g % 8):
            raise UnsupportedError(
                f"--format {self.name}: group size {g}; use -1 or a positive multiple of 8"
            )
        self.lm_head = bool(options.extra.get("lm_head", False))
        self._lm_heads: set[str] = set()
        self._defaults: set[str] = set()  # prefixes GPTQModel never quantizes

    @property
    def checkpoint_format(self) -> str:
        return "gptq_v2" if self.v2 else "gptq"

    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        if kind == "embedding":
            self._defaults.add(prefix)
            return "GPTQ leaves embeddings unquantized"
        if kind == "lm_head":
            self._lm_heads.add(prefix)
            if not self.lm_head:
                self._defaults.add(prefix)
                return "GPTQModel leaves lm_head unquantized unless lm_head is requested"
        n, k = shape
        g = self.options.group_size
        # AutoGPTQ sizes tensors as (K // 32) * b rows and (N // 32) * b zero words; keeping to
        # that makes files every GPTQ loader accepts.
        if k % 32 or n % 32:
            return f"[out, in] = [{n}, {k}]: GPTQ files need both multiples of 32"
        if g != -1 and k % g:
            return f"in_features {k} is not a multiple of the group size {g}"
        return self._spec()

    def _spec(self) -> QuantSpec:
        o = self.options
        layer = LayerConfig(o.bits, o.group_size, o.sym, o.act_order)
        return gptq_spec(layer, o.act_order and o.group_size != -1, self.v2)

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float16  # GPTQModel always stores F16 scales

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        spec = weight.spec
        if not spec.is_uint or spec.bits not in _BITS or spec.act is not None or weight.data.dim() != 2:
            raise UnsupportedError(f"{prefix}: --format {self.name} cannot store {spec.describe()}")
        n, k = weight.shape
        b = spec.bits
        group = spec.group_size if spec.granularity == "group" else k
        if weight.group_index is not None:
            g_idx = weight.group_index.to(torch.int32)
        else:
            g_idx = (torch.arange(k) // max(group, 1)).to(torch.int32)  # GPTQModel always writes g_idx
        zeros = weight.zero if weight.zero is not None else torch.full_like(weight.scale, spec.implicit_zero)
        zeros = zeros.to(torch.int64).reshape(n, -1).T.contiguous()  # [ng, N]
        scales = weight.scale.reshape(n, -1).T.contiguous()  # [ng, N]
        half = scales.to(torch.float16)
        if bool(((~torch.isfinite(half)) | ((half == 0) & (scales != 0))).any()):
            raise NumericsError(f"{prefix}.scales: scales do not fit in float16 (overflow or flush to zero)")
        return {
            f"{prefix}.qweight": pack_bits(weight.data.T.contiguous(), b, dim=0),  # [ceil(K*b/32), N]
            f"{prefix}.qzeros": encode_zeros(zeros, b, self.v2),  # [ng, ceil(N*b/32)]
            f"{prefix}.scales": half,  # [ng, N]
            f"{prefix}.g_idx": g_idx,  # [K]
        }

    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        o = self.options
        lm_head = self.lm_head and bool(self._lm_heads) and not (self._lm_heads & set(skipped))
        # "-:" rules are anchored regexes on the full module name (re.match), one per skipped layer.
        dynamic: dict[str, dict[str, Any]] = {
            f"-:{re.escape(p)}$": {} for p in skipped if p not in self._defaults
        }
        config: dict[str, Any] = {
            "bits": o.bits,
            "group_size": o.group_size,
            "desc_act": o.act_order,
            "lm_head": lm_head,
            "method": "gptq",
            "quant_method": "gptq",
            "format": self.checkpoint_format,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"anyquant:{__version__}"], "static_groups": False},
            "sym": o.sym,
        }
        if dynamic:
            config["dynamic"] = dynamic
        return config

    def side_files(self, skipped: list[str]) -> dict[str, dict[str, Any]]:
        return {"quantize_config.json": self.quantization_config(skipped)}


@register_writer
class GptqV2Writer(GptqWriter):
    """GPTQ v2 files (`format: gptq_v2`): zero points stored as-is."""

    name = "gptq-v2"
    v2 = True
