"""compressed-tensors checkpoints (llm-compressor output): reader and writer (formats.md §4).

Owns the `quantization_config` semantics (config groups, `targets` / `ignore` matching, per-group
formats, status and rejected variants) and the byte layouts of `pack-quantized`, `int-quantized`,
`float-quantized` and `naive-quantized`, translated to and from the canonical `QuantWeight`.
Tensor presence decides whether a layer is quantized (§1.3); the config only says how.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import NumericsError, QuantConfigError, TensorError, UnsupportedError
from anyquant.quant.formats.base import (
    FormatWriter,
    HeaderIndex,
    QuantFormat,
    StoredNames,
    WriteOptions,
    require_dtype,
    require_layer_shape,
    require_shape,
)
from anyquant.quant.packing import pack_bits, packed_len, unpack_bits
from anyquant.quant.registry import register_format, register_writer
from anyquant.quant.spec import ActQuant, ActType, Granularity, LayerKind, QuantSpec, WeightType
from anyquant.quant.weight import (
    QuantWeight,
    expected_scale_shape,
    num_groups,
    require_finite,
    require_finite_codes,
)
from anyquant.quant.weight_types import canonical_uint

# The `version` the writer stamps: the compressed-tensors release whose byte layout it reproduces and
# was checked against, not whatever library happens to be installed (the writer does not use the
# library). Readers, ours and the library's, use the version only to tell 0.17's padded sub-byte
# packing from the dense packing of every release since 0.18, so a later release reads it the same.
WRITTEN_VERSION = "0.20.0"
_QUANT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
_DENSE_FORMATS = ("dense", "fakequant")  # "fakequant" is the library's default for unsaved configs
_REJECTED_FORMATS = {
    "marlin-24": "2:4-sparse Marlin layout",
    "sparse-bitmask": "bitmask sparsity",
    "sparse-24-bitmask": "2:4 bitmask sparsity",
    "nvfp4-pack-quantized": "NVFP4 (fp4 weights with fp8 group scales)",
    "mxfp4-pack-quantized": "MXFP4 microscaling",
    "mxfp6-pack-quantized": "MXFP6 microscaling",
    "mxfp8-quantized": "MXFP8 microscaling",
}
_STATUSES = ("initialized", "calibration", "frozen", "compressed", "decompressed")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
# Quantization parameters a non-compressed (fake-quant) checkpoint keeps beside its float weight,
# and the attention / KV-cache scales of kv_cache_scheme; both are deliberately left unused.
_QPARAM_SUFFIXES = (
    *(f".{base}_{what}" for base in ("weight", "input", "output") for what in ("scale", "zero_point")),
    *(".weight_g_idx", ".weight_shape", ".weight_global_scale", ".input_global_scale"),
)
_KV_SUFFIXES = (".k_scale", ".v_scale", ".q_scale", ".k_zero_point", ".v_zero_point", ".q_zero_point")

# The code layouts each storage format may hold: packed int32 words, an I8 or an F8_E4M3 weight.
_LAYOUT_OF_FORMAT = {
    "pack-quantized": ("packed",),
    "int-quantized": ("int8",),
    "float-quantized": ("fp8",),
    "naive-quantized": ("int8", "fp8"),
}
_LAYOUT_TENSORS = {
    "packed": "weight_packed (I32)",
    "int8": "weight (I8) + weight_scale",
    "fp8": "weight (F8_E4M3) + weight_scale",
}


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class QuantArgs:
    """One `weights` / `input_activations` entry of a config group, validated."""

    num_bits: int
    type: str  # "int" | "float"
    symmetric: bool
    strategy: str  # tensor | channel | group | block | token
    group_size: int  # 0 unless strategy == "group"
    block: tuple[int, int]  # (rows, cols), only for strategy == "block"
    dynamic: bool
    actorder: str | None  # "group" (real g_idx) | "weight" (calibration only) | None


@dataclass(frozen=True)
class ConfigGroup:
    name: str
    targets: tuple[str, ...]
    format: str | None  # per-group storage format, None: use the top-level one
    weights: QuantArgs | None
    acts: QuantArgs | None


def _fail(where: str, value: Any, why: str) -> QuantConfigError:
    return QuantConfigError(f"quantization_config.{where} = {value!r}: {why}")


def _int(raw: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{where}.{key}", value, "expected an integer")
    return value


def _block(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, str):  # very old files write "128x128"
        parts = value.lower().split("x")
        value = [int(p) for p in parts] if all(p.isdigit() for p in parts) else None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise _fail(f"{where}.block_structure", value, "expected [rows, cols] of positive integers")
    return int(value[0]), int(value[1])


def _strategy(raw: dict[str, Any], group_size: int | None, where: str) -> str:
    strategy = raw.get("strategy")
    if strategy is None:  # older files: inferred from group_size as the library does
        return "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    if not isinstance(strategy, str):
        raise _fail(f"{where}.strategy", strategy, "expected a string")
    return strategy.lower()


def _actorder(value: Any, where: str) -> str | None:
    if value is None or value is False:
        return None
    if value is True:  # old files: true meant "group"
        return "group"
    aliases = {"static": "weight", "dynamic": "group", "weight": "weight", "group": "group"}
    if not isinstance(value, str) or value.lower() not in aliases:
        raise _fail(f"{where}.actorder", value, "expected null, 'weight'/'static' or 'group'/'dynamic'")
    return aliases[value.lower()]


def parse_args(raw: Any, where: str) -> QuantArgs | None:
    """Validate one QuantizationArgs object; `where` names it for messages."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(where, raw, "expected an object or null")
    num_bits = _int(raw, "num_bits", where, 8) or 0
    qtype = str(raw.get("type", "int")).lower()
    if qtype not in ("int", "float"):
        raise _fail(f"{where}.type", raw.get("type"), "expected 'int' or 'float'")
    symmetric = raw.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise _fail(f"{where}.symmetric", symmetric, "expected true or false")
    group_size = _int(raw, "group_size", where, None)
    strategy = _strategy(raw, group_size, where)
    if strategy == "group" and (group_size is None or group_size <= 0):
        raise _fail(f"{where}.group_size", group_size, "strategy 'group' needs a positive group_size")
    block = (0, 0)
    if strategy == "block":
        block = _block(raw.get("block_structure"), where)
    dynamic = raw.get("dynamic", False)
    if isinstance(dynamic, str):
        raise _fail(f"{where}.dynamic", dynamic, "locally dynamic (tensor_group / NVFP4) is not supported")
    if not isinstance(dynamic, bool):
        raise _fail(f"{where}.dynamic", dynamic, "expected true or false")
    return QuantArgs(
        num_bits=num_bits,
        type=qtype,
        symmetric=symmetric,
        strategy=strategy,
        group_size=(group_size or 0) if strategy == "group" else 0,
        block=block,
        dynamic=dynamic,
        actorder=_actorder(raw.get("actorder"), where),
    )


def _check_weights(w: QuantArgs, where: str) -> None:
    if w.dynamic:
        raise _fail(f"{where}.dynamic", True, "dynamic weight quantization does not exist on disk")
    if w.type == "float" and w.num_bits != 8:
        raise _fail(
            f"{where}.num_bits", w.num_bits, "float weights other than fp8 (fp4/fp6) are not supported"
        )
    if w.type == "float" and not w.symmetric:
        raise _fail(f"{where}.symmetric", False, "asymmetric fp8 weights are not supported")
    if w.type == "int" and not 1 <= w.num_bits <= 8:
        raise _fail(f"{where}.num_bits", w.num_bits, "integer weights of 1..8 bits are supported")
    if w.strategy not in ("tensor", "channel", "group", "block"):
        raise _fail(f"{where}.strategy", w.strategy, "expected tensor, channel, group or block for weights")
    if w.strategy == "group" and w.group_size % 8:
        raise _fail(f"{where}.group_size", w.group_size, "anyquant needs group sizes that are multiples of 8")
    if w.strategy == "block" and w.type != "float":
        raise _fail(f"{where}.strategy", "block", "block scales are supported for fp8 weights only")


def _check_acts(a: QuantArgs, where: str) -> None:
    if a.num_bits != 8:
        raise _fail(f"{where}.num_bits", a.num_bits, "only 8-bit (int8 / fp8) activations are supported")
    if a.dynamic and a.strategy not in ("token", "group", "tensor"):
        raise _fail(f"{where}.strategy", a.strategy, "dynamic activations need token, group or tensor")
    if not a.dynamic and a.strategy != "tensor":
        raise _fail(f"{where}.strategy", a.strategy, "static activations are supported per tensor only")
    if not a.symmetric and (a.dynamic or a.type == "float"):
        raise _fail(f"{where}.symmetric", False, "asymmetric activations need static int8")
    if a.actorder is not None:
        raise _fail(f"{where}.actorder", a.actorder, "activation ordering applies to weights only")


def _check_format(value: Any, where: str, allow_mixed: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(where, value, "expected a string")
    fmt = value.lower()
    if fmt in _REJECTED_FORMATS or fmt.startswith("mxfp"):
        why = _REJECTED_FORMATS.get(fmt, "microscaling formats")
        raise _fail(where, value, f"{why} is not supported by anyquant")
    known = (*_QUANT_FORMATS, *_DENSE_FORMATS, *(("mixed-precision",) if allow_mixed else ()))
    if fmt not in known:
        raise _fail(where, value, f"unknown format; anyquant reads {', '.join(known)}")
    return fmt


def _is_empty(value: Any) -> bool:
    """Empty sparsity/transform configs come as null, {} or objects whose members are all empty."""
    if not value:
        return True
    return isinstance(value, dict) and all(not v for v in value.values())


def _preset_group(name: str, targets: Any) -> dict[str, Any]:
    """A config group written as a preset reference, e.g. {"W4A16": ["Linear"]}."""
    preset = PRESETS.get(name.upper())
    if preset is None:
        raise _fail(f"config_groups.{name}", targets, f"unknown preset; known: {', '.join(sorted(PRESETS))}")
    return {"targets": targets, "weights": preset.weights, "input_activations": preset.acts}


def parse_group(name: str, raw: Any) -> ConfigGroup:
    where = f"config_groups.{name}"
    if isinstance(raw, list):
        raw = _preset_group(name, raw)
    if not isinstance(raw, dict):
        raise _fail(where, raw, "expected a scheme object")
    targets = raw.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise _fail(f"{where}.targets", targets, "expected a non-empty list of strings")
    weights = parse_args(raw.get("weights"), f"{where}.weights")
    acts = parse_args(raw.get("input_activations"), f"{where}.input_activations")
    if raw.get("output_activations") is not None:
        raise _fail(
            f"{where}.output_activations", raw["output_activations"], "output quantization is not supported"
        )
    if weights is not None:
        _check_weights(weights, f"{where}.weights")
    if acts is not None:
        _check_acts(acts, f"{where}.input_activations")
        if weights is None:
            raise _fail(f"{where}.weights", None, "activation-only quantization is not supported")
    fmt = _check_format(raw.get("format"), f"{where}.format", allow_mixed=False)
    return ConfigGroup(name, tuple(targets), fmt, weights, acts)


def _parse_version(value: Any) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", value) if isinstance(value, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _compile_target(target: str, where: str) -> re.Pattern[str] | None:
    if not target.startswith("re:"):
        return None
    try:
        return re.compile(target[3:])
    except re.error as exc:
        raise _fail(where, target, f"invalid regular expression: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Mapping config groups to canonical specs


def _granularity(w: QuantArgs, layout: str) -> tuple[Granularity, int, tuple[int, int]]:
    """(granularity, group_size, block_shape) of the canonical spec for these weight args."""
    if w.strategy == "group":
        if layout == "fp8":  # one fp8 scale per row and G columns is a 1 x G block
            return "block", 0, (1, w.group_size)
        return "group", w.group_size, (0, 0)
    if w.strategy == "block":
        return "block", 0, w.block
    if w.strategy == "tensor" and layout != "packed":
        return "tensor", 0, (0, 0)
    # channel; or tensor for uintN, which is per channel or group: the one scale repeats per row
    return "channel", 0, (0, 0)


def act_quant(a: QuantArgs | None) -> ActQuant | None:
    if a is None:
        return None
    kind: ActType = "int8" if a.type == "int" else "fp8_e4m3"
    if a.dynamic:
        # compressed-tensors' reference scales int8 by amax / ((127 - -128) / 2) = amax / 127.5.
        divisor = 127.5 if kind == "int8" else None
        if a.strategy == "group":
            return ActQuant(kind, True, "group", a.group_size, scale_divisor=divisor)
        return ActQuant(kind, True, "token" if a.strategy == "token" else "tensor", scale_divisor=divisor)
    return ActQuant(kind, False, "tensor", symmetric=a.symmetric)


def spec_from_args(
    w: QuantArgs,
    a: QuantArgs | None,
    layout: str,
    *,
    has_zero: bool,
    act_order: bool,
    fmt: str,
) -> QuantSpec:
    gran, group_size, block = _granularity(w, layout)
    weight: WeightType
    extra: list[tuple[str, str]] = [("format", fmt)]
    if layout == "packed":
        weight = canonical_uint(w.num_bits)
        if int(weight[4:]) != w.num_bits:
            extra.append(("stored_bits", str(w.num_bits)))
    elif layout == "int8":
        weight = "int8"
        if w.num_bits != 8:
            extra.append(("stored_bits", str(w.num_bits)))
    else:
        weight = "fp8_e4m3"
    return QuantSpec(
        weight=weight,
        granularity=gran,
        group_size=group_size,
        block_shape=block,
        has_zero=has_zero,
        act=act_quant(a),
        act_order=act_order,
        extra=tuple(extra),
    )


@dataclass(frozen=True)
class _Layer:
    """What spec_for resolved for one prefix, kept for stored_names and decode."""

    spec: QuantSpec
    layout: str  # packed | int8 | fp8
    bits: int  # stored bits per code
    symmetric: bool  # as the config group says
    zero_stored: bool  # a weight_zero_point tensor is present
    input_zero_stored: bool


# ---------------------------------------------------------------------------------------------
# Reader


@register_format("compressed-tensors")
class CompressedTensorsFormat(QuantFormat):
    name = "compressed-tensors"
    marker_suffixes = (".weight_packed", ".weight_scale")

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        try:
            self._parse(qconfig)
        except QuantConfigError as exc:
            raise QuantConfigError(f"{source}: {exc}") from None
        self._layers: dict[str, _Layer] = {}

    # -- configuration -----------------------------------------------------------------------
    def _parse(self, qc: dict[str, Any]) -> None:
        raw_groups = qc.get("config_groups")
        if not isinstance(raw_groups, dict) or not raw_groups:
            raise _fail("config_groups", raw_groups, "expected a non-empty object of config groups")
        self.groups = [parse_group(str(name), raw) for name, raw in raw_groups.items()]
        self.top_format = _check_format(qc.get("format"), "format", allow_mixed=True)
        status = qc.get("quantization_status", "compressed")
        if status not in _STATUSES:
            raise _fail("quantization_status", status, f"expected one of {', '.join(_STATUSES)}")
        self.compressed = status == "compressed"
        if not self.compressed:
            self.note(
                f"quantization_status {status!r}: weights are stored as fake-quantized floats; "
                "loading every layer unquantized (their scales and zero points are unused)"
            )
        for key in ("sparsity_config", "transform_config", "moe_sparsity_config"):
            if not _is_empty(qc.get(key)):
                raise _fail(key, qc[key], "sparse / transformed / pruned checkpoints are not supported")
        self.kv_cache = qc.get("kv_cache_scheme") is not None
        if self.kv_cache:
            self.note(
                "kv_cache_scheme is set: the stored KV-cache scales are ignored (cache kept in model dtype)"
            )
        ignore = qc.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
            raise _fail("ignore", ignore, "expected a list of strings")
        self.ignore = tuple(ignore)
        self.version = _parse_version(qc.get("version"))
        self._patterns: dict[str, re.Pattern[str] | None] = {}
        for i, target in enumerate(self.ignore):
            self._patterns[target] = _compile_target(target, f"ignore[{i}]")
        # Later groups win a target defined twice, as in the library's target -> scheme table.
        self._by_target: dict[str, ConfigGroup] = {}
        for group in self.groups:
            for i, target in enumerate(group.targets):
                self._patterns[target] = _compile_target(target, f"config_groups.{group.name}.targets[{i}]")
                self._by_target[target] = group

    def describe(self) -> str:
        parts = []
        for g in self.groups:
            w = g.weights
            what = "no weights" if w is None else f"{w.type}{w.num_bits} {w.strategy}"
            if w is not None and w.strategy == "group":
                what += str(w.group_size)
            if w is not None and w.type == "int":
                what += " sym" if w.symmetric else " asym"
            act = act_quant(g.acts)
            if act is not None:
                what += f", act {act.describe()}"
            parts.append(f"{g.name}: {g.format or self.top_format} {what}")
        return f"{self.name} {self.top_format or '?'} ({'; '.join(parts)})"

    def ignored_tensor(self, name: str) -> bool:
        """Tensors the loader may leave unused: KV-cache scales, and the q-params of a
        fake-quantized (not compressed) checkpoint."""
        if self.kv_cache and name.endswith(_KV_SUFFIXES):
            return True
        return not self.compressed and name.endswith(_QPARAM_SUFFIXES)

    # -- per-module resolution (§4.1) ------------------------------------------------------
    def _rank(self, target: str, prefix: str, kind: LayerKind) -> int | None:
        """0 exact name, 1 regex, 2 class name; None: no match."""
        pattern = self._patterns.get(target)
        if pattern is not None:
            return 1 if pattern.match(prefix) else None
        if target == prefix:
            return 0
        classes = ("Embedding",) if kind == "embedding" else ("Linear",)
        return 2 if target in classes else None

    def _ignored(self, prefix: str, kind: LayerKind) -> bool:
        return any(self._rank(t, prefix, kind) is not None for t in self.ignore)

    def _group_for(self, prefix: str, kind: LayerKind) -> ConfigGroup | None:
        # exact > regex > class; ties broken by the target string, like the library's sort
        matches = [
            (rank, target)
            for target in self._by_target
            if (rank := self._rank(target, prefix, kind)) is not None
        ]
        return self._by_target[min(matches)[1]] if matches else None

    def _stored_layout(self, prefix: str) -> str:
        """packed | int8 | fp8 (quantized marker present), dense, or none (no weight at all)."""
        if self.index.has_data(f"{prefix}.weight_packed"):
            return "packed"
        info = self.index.get(f"{prefix}.weight")
        if info is None or info.numel == 0:
            return "none"
        if info.dtype == "I8":
            return "int8"
        if info.dtype.startswith("F8_"):
            return "fp8"
        return "dense"

    def _storage_format(self, group: ConfigGroup) -> str | None:
        if group.format is not None:
            return group.format
        top = self.top_format
        return top if top in _QUANT_FORMATS or top in _DENSE_FORMATS else None

    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        group = self._group_for(prefix, kind)
        ignored = self._ignored(prefix, kind)
        layout = self._stored_layout(prefix)
        configured = group is not None and group.weights is not None and not ignored
        fmt = self._storage_format(group) if group is not None else None
        expects_quant = configured and self.compressed and fmt not in _DENSE_FORMATS
        gname = group.name if group is not None else "?"
        if layout == "dense":
            if expects_quant:
                self.note(
                    f"{prefix}: config group {gname!r} targets it but the checkpoint stores a plain "
                    "float weight; loading it unquantized"
                )
            return None
        if layout == "none":
            if expects_quant and kind != "lm_head":  # a tied lm_head has no tensor of its own
                raise TensorError(
                    f"{prefix}.weight",
                    f"missing: config group {gname!r} quantizes this layer, expected "
                    f"{prefix}.weight_packed or a quantized {prefix}.weight (none present or all empty)",
                )
            return None
        if ignored:
            self.note(f"{prefix}: listed in 'ignore' but its tensors are quantized; following the tensors")
        elif not configured:
            self.note(
                f"{prefix}: no config group targets it but its tensors are quantized; following the tensors"
            )
        if group is None or group.weights is None:
            group = self._fallback_group(prefix, layout)
            fmt = self._storage_format(group)
        layer = self._resolve(prefix, group, fmt, layout)
        self._layers[prefix] = layer
        return layer.spec

    def _fallback_group(self, prefix: str, layout: str) -> ConfigGroup:
        fits = [
            g
            for g in self.groups
            if g.weights is not None and (g.weights.type == "float") == (layout == "fp8")
        ]
        if len(fits) != 1:
            raise QuantConfigError(
                f"{self.source}: {prefix} is stored quantized ({_LAYOUT_TENSORS[layout]}) but no config "
                f"group targets it and {len(fits)} groups could describe it; cannot tell its scheme"
            )
        return fits[0]

    def _resolve(self, prefix: str, group: ConfigGroup, fmt: str | None, layout: str) -> _Layer:
        w = group.weights
        assert w is not None  # callers pick groups with weights
        if fmt is None or fmt in _DENSE_FORMATS:
            fmt = {"packed": "pack-quantized", "int8": "int-quantized", "fp8": "float-quantized"}[layout]
            self.note(f"{prefix}: storage format not given by the config; read as {fmt} from the tensors")
        marker = f"{prefix}.weight_packed" if layout == "packed" else f"{prefix}.weight"
        if layout not in _LAYOUT_OF_FORMAT[fmt]:
            want = " or ".join(_LAYOUT_TENSORS[x] for x in _LAYOUT_OF_FORMAT[fmt])
            raise TensorError(
                marker,
                f"config group {group.name!r} stores {fmt} ({want}) but the checkpoint holds "
                f"{_LAYOUT_TENSORS[layout]}",
            )
        if (w.type == "float") != (layout == "fp8"):
            raise TensorError(
                marker, f"holds {_LAYOUT_TENSORS[layout]} but group {group.name!r} has {w.type} weights"
            )
        required = ["weight_scale"] + (["weight_shape"] if layout == "packed" else [])
        missing = [f"{prefix}.{s}" for s in required if not self.index.has_data(f"{prefix}.{s}")]
        zero_stored = self.index.has_data(f"{prefix}.weight_zero_point")
        if not w.symmetric and not zero_stored:
            missing.append(f"{prefix}.weight_zero_point")
        act_order = self.index.has_data(f"{prefix}.weight_g_idx")
        self._note_actorder(prefix, w, act_order)
        input_zero = self.index.has_data(f"{prefix}.input_zero_point")
        if group.acts is not None and not group.acts.dynamic:
            if not self.index.has_data(f"{prefix}.input_scale"):
                missing.append(f"{prefix}.input_scale")
            if not group.acts.symmetric and not input_zero:
                missing.append(f"{prefix}.input_zero_point")
        if missing:
            raise TensorError(
                missing[0],
                f"missing or empty: {marker} is stored {fmt} (group {group.name!r}) and needs "
                f"{', '.join(missing)}",
            )
        # Codes narrower than their canonical width (5..7 bits in uint8) carry explicit zeros.
        widened = layout == "packed" and canonical_uint(w.num_bits) != f"uint{w.num_bits}"
        try:
            spec = spec_from_args(
                w, group.acts, layout, has_zero=not w.symmetric or widened, act_order=act_order, fmt=fmt
            )
        except ValueError as exc:
            raise TensorError(marker, f"cannot be described by group {group.name!r}: {exc}") from None
        return _Layer(spec, layout, w.num_bits, w.symmetric, zero_stored, input_zero)

    def _note_actorder(self, prefix: str, w: QuantArgs, has_gidx: bool) -> None:
        if w.actorder == "group" and not has_gidx:
            self.note(f"{prefix}: actorder 'group' but no weight_g_idx tensor; using column // group_size")
        elif has_gidx and w.actorder != "group":
            self.note(f"{prefix}: weight_g_idx present although actorder is {w.actorder!r}; using it")

    def _layer(self, prefix: str, spec: QuantSpec) -> _Layer:
        layer = self._layers.get(prefix)
        if layer is None:
            if self.spec_for(prefix, "linear") is None:
                raise TensorError(f"{prefix}.weight", "the layer is not stored quantized")
            layer = self._layers[prefix]
        if layer.spec != spec:
            raise ValueError(
                f"{prefix}: decode called with {spec.describe()}, resolved {layer.spec.describe()}"
            )
        return layer

    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        layer = self._layer(prefix, spec)
        if layer.layout == "packed":
            required = [f"{prefix}.weight_packed", f"{prefix}.weight_scale", f"{prefix}.weight_shape"]
        else:
            required = [f"{prefix}.weight", f"{prefix}.weight_scale"]
        optional: list[str] = []
        zp = f"{prefix}.weight_zero_point"
        if layer.zero_stored:
            # Symmetric files of older releases may carry all-zero zero points: optional then.
            (optional if layer.symmetric else required).append(zp)
        if spec.act_order:
            required.append(f"{prefix}.weight_g_idx")
        act = spec.act
        if act is not None and not act.dynamic:
            required.append(f"{prefix}.input_scale")
            if layer.input_zero_stored:
                (optional if act.symmetric else required).append(f"{prefix}.input_zero_point")
        return StoredNames(tuple(required), tuple(optional))

    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        layer = self._layer(prefix, spec)
        n, k = shape
        if layer.layout == "packed":
            name = f"{prefix}.weight_packed"
            packed = _get(stored, name)
            require_dtype(name, packed, torch.int32)
            if packed.dim() != 2 or packed.shape[0] != n:
                want = (n, packed_len(k, layer.bits))
                require_layer_shape(name, packed, want, f"[N, words of {layer.bits}-bit codes]", shape)
            self._bit_layout(layer.bits, k, packed.shape[-1], name)
            shape_name = f"{prefix}.weight_shape"
            require_dtype(shape_name, _get(stored, shape_name), *_INT_DTYPES)
            require_shape(shape_name, _get(stored, shape_name), (2,), "the original [N, K]")
        else:
            name = f"{prefix}.weight"
            data = _get(stored, name)
            require_dtype(name, data, torch.int8 if layer.layout == "int8" else torch.float8_e4m3fn)
            require_layer_shape(name, data, shape, "[out, in]", shape)
        scale_name = f"{prefix}.weight_scale"
        scale = _get(stored, scale_name)
        require_dtype(scale_name, scale, *_FLOAT_DTYPES)
        _match_scale_layout(scale_name, scale, spec, shape, ())
        zp_name = f"{prefix}.weight_zero_point"
        if layer.zero_stored and zp_name in stored:
            zp = stored[zp_name]
            require_dtype(zp_name, zp, *_INT_DTYPES)
            if layer.layout == "packed" and zp.dtype == torch.int32 and zp.dim() == 2:
                # Packed along N: one bitstream per column of groups (see _packed_zero).
                self._bit_layout(layer.bits, n, zp.shape[-2], zp_name)
                zp = torch.empty((n, zp.shape[-1]), device="meta")
            _match_scale_layout(zp_name, zp, spec, shape, ())
        elif spec.has_zero and layer.layout != "packed":
            raise TensorError(zp_name, "missing: the weights are asymmetric")
        if spec.act_order:
            _group_index_layout(f"{prefix}.weight_g_idx", stored, (), k)
        act = spec.act
        if act is not None and not act.dynamic:
            _input_scalar_layout(f"{prefix}.input_scale", stored, (), float_value=True)
            if f"{prefix}.input_zero_point" in stored:
                _input_scalar_layout(f"{prefix}.input_zero_point", stored, (), float_value=False)

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        layer = self._layer(prefix, spec)
        if layer.layout == "packed":
            weight = self._decode_packed(prefix, layer, stored)
        else:
            weight = self._decode_unpacked(prefix, layer, stored)
        return weight.validate(prefix)

    def _decode_packed(self, prefix: str, layer: _Layer, stored: dict[str, Tensor]) -> QuantWeight:
        spec, bits = layer.spec, layer.bits
        name = f"{prefix}.weight_packed"
        packed = _get(stored, name)
        require_dtype(name, packed, torch.int32)
        if packed.dim() not in (2, 3):
            raise TensorError(name, f"shape {list(packed.shape)}, expected [N, words] or [E, N, words]")
        lead = tuple(packed.shape[:-2])
        n, k = _logical_shape(stored, f"{prefix}.weight_shape", lead)
        if packed.shape[-2] != n:
            raise TensorError(name, f"has {packed.shape[-2]} rows but weight_shape says N = {n}")
        layout = self._bit_layout(bits, k, packed.shape[-1], name)
        codes = _unpack(packed, bits, k, layout)  # [*lead, N, K] uint8
        scale_name = f"{prefix}.weight_scale"
        scale = _canonical_scale(scale_name, _get(stored, scale_name), spec, (n, k), lead)
        zero = self._packed_zero(prefix, layer, stored, lead, (n, k))
        gidx = _group_index(prefix, spec, stored, lead, k)
        return QuantWeight(spec, (n, k), codes, scale, zero, gidx)

    def _bit_layout(self, bits: int, count: int, width: int, name: str) -> str:
        """'dense' bitstream (all releases for 1/2/4/8 bits, >= 0.18 for 3/5/6/7) or 'padded'
        (0.17.x: floor(32/b) codes per word, top bits unused), told apart by the word count."""
        dense = packed_len(count, bits)
        per = 32 // bits
        padded = -(-count // per)
        same_bits = 32 % bits == 0 or count <= per  # both layouts put every code at the same bits
        if width == dense and (same_bits or dense != padded):
            return "dense"
        if width == padded and dense != padded:
            return "padded"
        if width == dense == padded:
            if self.version is None:
                self.note(
                    f"{name}: dense or 0.17.x padded packing look alike and 'version' is absent; read as dense"
                )
            return "padded" if self.version is not None and self.version < (0, 18) else "dense"
        alt = "" if dense == padded else f" (dense bitstream) or {padded} (compressed-tensors 0.17.x padding)"
        raise TensorError(
            name,
            f"{width} words along the packed dimension, expected {dense}{alt} for {count} {bits}-bit values",
        )

    def _packed_zero(
        self,
        prefix: str,
        layer: _Layer,
        stored: dict[str, Tensor],
        lead: tuple[int, ...],
        shape: tuple[int, int],
    ) -> Tensor | None:
        spec, bits = layer.spec, layer.bits
        offset = 1 << (bits - 1)
        scale_shape = (*lead, *expected_scale_shape(spec, shape))
        explicit = spec.has_zero and bits != spec.bits  # 5..7-bit codes need their offset stored
        if not layer.zero_stored:
            return torch.full(scale_shape, offset, dtype=torch.int32) if explicit else None
        name = f"{prefix}.weight_zero_point"
        zp = _get(stored, name)
        require_dtype(name, zp, *_INT_DTYPES)
        n = shape[0]
        if zp.dtype == torch.int32 and zp.dim() == len(lead) + 2:
            # Packed along N (dim -2), one bitstream per column of groups, same offset as codes.
            layout = self._bit_layout(bits, n, zp.shape[-2], name)
            unsigned = _unpack(zp.movedim(-2, -1), bits, n, layout).movedim(-1, -2).to(torch.int32)
        else:
            # Releases < 0.9.4 (and tensor strategy) keep signed zero points unpacked.
            unsigned = zp.to(torch.int32) + offset
            if unsigned.numel() and (int(unsigned.min()) < 0 or int(unsigned.max()) >= 1 << bits):
                raise TensorError(name, f"signed zero points outside the {bits}-bit range")
        zero = _match_scale_layout(name, unsigned, spec, shape, lead)
        if layer.symmetric and bool((zero != offset).any()):
            raise TensorError(name, "the config says symmetric but the stored zero points are not all 0")
        return zero if spec.has_zero else None

    def _decode_unpacked(self, prefix: str, layer: _Layer, stored: dict[str, Tensor]) -> QuantWeight:
        spec = layer.spec
        name = f"{prefix}.weight"
        data = _get(stored, name)
        require_dtype(name, data, torch.int8 if layer.layout == "int8" else torch.float8_e4m3fn)
        if data.dim() not in (2, 3):
            raise TensorError(name, f"shape {list(data.shape)}, expected [N, K] or [E, N, K]")
        lead = tuple(data.shape[:-2])
        n, k = data.shape[-2], data.shape[-1]
        if n == 0 or k == 0:
            raise TensorError(name, f"zero-size weight {list(data.shape)}")
        if layer.layout == "fp8":
            require_finite_codes(name, data)
        scale_name = f"{prefix}.weight_scale"
        scale = _canonical_scale(scale_name, _get(stored, scale_name), spec, (n, k), lead)
        zero = None
        zp_name = f"{prefix}.weight_zero_point"
        if layer.zero_stored and zp_name in stored:
            zp = stored[zp_name]
            require_dtype(zp_name, zp, *_INT_DTYPES)
            zero = _match_scale_layout(zp_name, zp.to(torch.int32), spec, (n, k), lead)
            if not spec.has_zero:
                if bool(zero.any()):
                    raise TensorError(
                        zp_name, "the config says symmetric but the stored zero points are not all 0"
                    )
                zero = None
        elif spec.has_zero:
            raise TensorError(zp_name, "missing: the weights are asymmetric")
        gidx = _group_index(prefix, spec, stored, lead, k)
        weight = QuantWeight(spec, (n, k), data, scale, zero, gidx)
        act = spec.act
        if act is not None and not act.dynamic:
            weight.input_scale = _input_scalar(f"{prefix}.input_scale", stored, lead, float_value=True)
            iz_name = f"{prefix}.input_zero_point"
            if iz_name in stored:
                izero = _input_scalar(iz_name, stored, lead, float_value=False)
                if act.symmetric and bool(izero.any()):
                    raise TensorError(iz_name, "the config says symmetric but the input zero point is not 0")
                weight.input_zero = None if act.symmetric else izero
        return weight


# -- decoding helpers -------------------------------------------------------------------------


def _get(stored: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in stored:
        raise TensorError(name, "missing from the layer's stored tensors")
    return stored[name]


def _logical_shape(stored: dict[str, Tensor], name: str, lead: tuple[int, ...]) -> tuple[int, int]:
    t = _get(stored, name)
    require_dtype(name, t, *_INT_DTYPES)
    values = [int(v) for v in t.reshape(-1).tolist()]
    if len(values) != len(lead) + 2 or tuple(values[:-2]) != lead:
        raise TensorError(name, f"holds {values}, expected the original shape {[*lead, 'N', 'K']}")
    n, k = values[-2:]
    if n <= 0 or k <= 0:
        raise TensorError(name, f"holds {values}: a zero-size or negative dimension")
    return n, k


def _unpack(words: Tensor, bits: int, count: int, layout: str) -> Tensor:
    """`count` unsigned codes along the last dim of int32 `words` -> uint8."""
    if layout == "dense":
        return unpack_bits(words, bits, count)
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF  # logical shifts on the int32 bit patterns
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*w.shape[:-1], -1)
    return codes[..., :count].to(torch.uint8)


def _scale_shapes(spec: QuantSpec, shape: tuple[int, int]) -> list[tuple[int, ...]]:
    """Stored shapes accepted for a canonical scale (without the expert dim)."""
    n, _ = shape
    want = expected_scale_shape(spec, shape)
    if spec.granularity == "tensor":
        return [(1,), ()]
    if spec.granularity == "channel":
        shapes: list[tuple[int, ...]] = [(n, 1), (n,)]
        return shapes + ([(1,), ()] if spec.is_uint else [])  # uintN: tensor strategy repeated per row
    return [want]


def _match_scale_layout(
    name: str, values: Tensor, spec: QuantSpec, shape: tuple[int, int], lead: tuple[int, ...]
) -> Tensor:
    """Reshape a stored scale-shaped tensor to the canonical scale shape (checking it)."""
    want = (*lead, *expected_scale_shape(spec, shape))
    accepted = [(*lead, *s) for s in _scale_shapes(spec, shape)]
    if tuple(values.shape) not in accepted:
        raise TensorError(
            name, f"shape {list(values.shape)}, expected {list(accepted[0])} for {spec.describe()}"
        )
    if values.numel() == _prod(want):
        return values.reshape(want)
    # One value per tensor stored for a per-channel canonical scale: repeat it per row.
    return values.reshape(*lead, 1).expand(want).clone()


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _canonical_scale(
    name: str, scale: Tensor, spec: QuantSpec, shape: tuple[int, int], lead: tuple[int, ...]
) -> Tensor:
    require_dtype(name, scale, *_FLOAT_DTYPES)
    require_finite(name, scale)
    return _match_scale_layout(name, scale.to(torch.float32), spec, shape, lead)


def _group_index(
    prefix: str, spec: QuantSpec, stored: dict[str, Tensor], lead: tuple[int, ...], k: int
) -> Tensor | None:
    if not spec.act_order:
        return None
    name = f"{prefix}.weight_g_idx"
    gidx = _group_index_layout(name, stored, lead, k)
    ng = num_groups(k, spec.group_size)
    if gidx.numel() and (int(gidx.min()) < 0 or int(gidx.max()) >= ng):
        raise TensorError(name, f"group indices outside [0, {ng})")
    return gidx.to(torch.int32)


def _group_index_layout(name: str, stored: Mapping[str, Tensor], lead: tuple[int, ...], k: int) -> Tensor:
    gidx = _get(stored, name)
    require_dtype(name, gidx, *_INT_DTYPES)
    if tuple(gidx.shape) != (*lead, k):
        raise TensorError(name, f"shape {list(gidx.shape)}, expected {[*lead, k]}")
    return gidx


def _input_scalar_layout(
    name: str, stored: Mapping[str, Tensor], lead: tuple[int, ...], float_value: bool
) -> Tensor:
    t = _get(stored, name)
    require_dtype(name, t, *(_FLOAT_DTYPES if float_value else _INT_DTYPES))
    if t.numel() != _prod(lead) or tuple(t.shape) not in ((*lead, 1), lead):
        raise TensorError(name, f"shape {list(t.shape)}, expected {[*lead, 1]} (one value per tensor)")
    return t


def _input_scalar(name: str, stored: dict[str, Tensor], lead: tuple[int, ...], float_value: bool) -> Tensor:
    t = _input_scalar_layout(name, stored, lead, float_value)
    if float_value:
        require_finite(name, t, "values")
        return t.to(torch.float32).reshape(lead)
    if t.numel() and (int(t.min()) < -128 or int(t.max()) > 127):
        raise TensorError(name, "input zero point outside the int8 range")
    return t.to(torch.int32).reshape(lead)


# ---------------------------------------------------------------------------------------------
# Writer


@dataclass(frozen=True)
class Preset:
    """An llm-compressor scheme as compressed-tensors 0.20.0 serializes it in config.json."""

    weights: dict[str, Any]
    acts: dict[str, Any] | None


def _int_weights(bits: int, symmetric: bool = True, group_size: int | None = 128) -> dict[str, Any]:
    strategy = "group" if group_size else "channel"
    return {"dynamic": False, "group_size": group_size, "num_bits": bits, "strategy": strategy,
            "symmetric": symmetric, "type": "int"}  # fmt: skip


def _acts(kind: str, strategy: str, dynamic: bool, group_size: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"dynamic": dynamic, "group_size": group_size, "num_bits": 8,
                           "strategy": strategy, "symmetric": True, "type": kind}  # fmt: skip
    if kind == "float" and not dynamic:
        out["observer"] = "static_minmax"  # the FP8 preset sets it explicitly, so it is serialized
    return out


def _fp8_weights(strategy: str) -> dict[str, Any]:
    out: dict[str, Any] = {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": strategy,
                           "symmetric": True, "type": "float"}  # fmt: skip
    if strategy == "block":
        out["block_structure"] = [128, 128]
    return out


# compressed-tensors 0.20.0 `PRESET_SCHEMES` (the subset anyquant writes). Note that W8A16 is
# group-128 in this release (older releases used channel scales).
PRESETS: dict[str, Preset] = {
    "W2A16": Preset(_int_weights(2), None),
    "W3A16": Preset(_int_weights(3), None),
    "W4A16": Preset(_int_weights(4), None),
    "W8A16": Preset(_int_weights(8), None),
    "W4A16_ASYM": Preset(_int_weights(4, symmetric=False), None),
    "W8A8": Preset(_int_weights(8, group_size=None), _acts("int", "token", True)),
    "INT8": Preset(_int_weights(8, group_size=None), _acts("int", "token", True)),
    "FP8": Preset(_fp8_weights("tensor"), _acts("float", "tensor", False)),
    "FP8_DYNAMIC": Preset(_fp8_weights("channel"), _acts("float", "token", True)),
    "FP8_BLOCK": Preset(_fp8_weights("block"), _acts("float", "group", True, 128)),
}


def storage_format(weights: QuantArgs, acts: QuantArgs | None) -> str:
    """The format compressed-tensors infers for a Linear (its COMPRESSION_FORMAT_PRIORITY)."""
    if acts is not None and weights.type == "int":
        return "int-quantized"
    if weights.type == "int" and (acts is None or acts.type != "float"):
        return "pack-quantized"
    return "float-quantized" if acts is not None else "naive-quantized"


def _derived_preset(options: WriteOptions) -> Preset:
    """A scheme from --bits/--group-size/--sym/--act when no preset name was given."""
    if options.group_size != -1 and options.group_size <= 0:
        raise UnsupportedError(
            f"group size {options.group_size}: use a positive multiple of 8 or -1 (per channel)"
        )
    group = options.group_size if options.group_size > 0 else None
    act = options.act
    if act in (None, "none"):
        if options.bits not in (2, 3, 4, 8):
            raise UnsupportedError(
                f"compressed-tensors writer: {options.bits}-bit weights; choose 2, 3, 4 or 8"
            )
        return Preset(_int_weights(options.bits, options.sym, group), None)
    if act in ("int8-dynamic", "int8-static"):
        if options.bits != 8:
            raise UnsupportedError(f"int8 activations need 8-bit weights here, got {options.bits}")
        dynamic = act == "int8-dynamic"
        return Preset(
            _int_weights(8, options.sym, group), _acts("int", "token" if dynamic else "tensor", dynamic)
        )
    if act == "fp8-dynamic":
        return PRESETS["FP8_DYNAMIC"]
    if act == "fp8-static":
        return PRESETS["FP8"]
    raise UnsupportedError(f"activation scheme {act!r}; the compressed-tensors writer knows int8-dynamic, "
                           "int8-static, fp8-dynamic, fp8-static")  # fmt: skip


@register_writer
class CompressedTensorsWriter(FormatWriter):
    """Writes what llm-compressor + compressed-tensors 0.20.0 write for one preset scheme."""

    name = "compressed-tensors"

    def __init__(self, options: WriteOptions) -> None:
        super().__init__(options)
        if options.scheme is not None:
            preset = PRESETS.get(options.scheme.upper())
            if preset is None:
                raise UnsupportedError(
                    f"compressed-tensors scheme {options.scheme!r}; anyquant writes {', '.join(PRESETS)}"
                )
            if preset.weights.get("strategy") == "group" and options.group_size not in (128, -1):
                # --group-size overrides the preset's 128, as llm-compressor's scheme overrides do.
                if options.group_size <= 0 or options.group_size % 8:
                    raise UnsupportedError(f"group size {options.group_size}: use a positive multiple of 8")
                preset = Preset({**preset.weights, "group_size": options.group_size}, preset.acts)
        else:
            preset = _derived_preset(options)
        if options.act_order:
            raise UnsupportedError(
                "compressed-tensors 0.20.0 removed actorder 'group' (weight_g_idx); drop --act-order"
            )
        self.preset = preset
        weights = parse_args(preset.weights, "weights")
        acts = parse_args(preset.acts, "input_activations")
        assert weights is not None
        _check_weights(weights, "weights")
        self.format = storage_format(weights, acts)
        layout = {"pack-quantized": "packed", "int-quantized": "int8"}.get(self.format, "fp8")
        self.spec = spec_from_args(
            weights, acts, layout, has_zero=not weights.symmetric, act_order=False, fmt=self.format
        )
        self._model_dtype = torch.bfloat16
        self._quantized_lm_head = False

    @classmethod
    def options_for(cls, spec: QuantSpec) -> WriteOptions:
        # compressed-tensors 0.20.0 writes no act-order; FP8 block and static per-tensor FP8 exist
        # only as presets.
        options = replace(super().options_for(spec), act_order=False)
        if spec.is_float and spec.granularity == "block":
            return replace(options, scheme="FP8_BLOCK")
        if spec.is_float and spec.granularity == "tensor" and spec.act is not None and not spec.act.dynamic:
            return replace(options, scheme="FP8")
        return options

    def _amax(self, prefix: str) -> float | None:
        table = self.options.extra.get("act_amax") or {}
        value = table.get(prefix)
        return None if value is None else float(value)

    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        if kind == "embedding":
            return "compressed-tensors presets target Linear layers; embeddings stay in the model dtype"
        if min(shape) <= 0:
            return f"zero-size layer {list(shape)}"
        act = self.spec.act
        if act is not None and not act.dynamic and self._amax(prefix) is None:
            return (
                f"static activation scale needs calibration: no options.extra['act_amax'][{prefix!r}] "
                "(use a dynamic scheme or pass calibration amax)"
            )
        spec = self.spec
        if spec.granularity == "group" and shape[1] % spec.group_size:
            # The library's own loader refuses ragged groups ("tensor column shape must be divisible").
            return f"in_features {shape[1]} is not a multiple of the group size {spec.group_size}"
        if spec.act is not None and spec.act.granularity == "group" and shape[1] % spec.act.group_size:
            return (
                f"in_features {shape[1]} is not a multiple of the activation group size "
                f"{spec.act.group_size} (compressed-tensors cannot run it)"
            )
        if kind == "lm_head":
            self._quantized_lm_head = True
        return spec

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # The library keeps scales in the observed weight's dtype when it is a float type.
        self._model_dtype = model_dtype if model_dtype in _FLOAT_DTYPES else torch.float16
        return self._model_dtype

    def input_scale(self, prefix: str) -> Tensor | None:
        act = self.spec.act
        amax = self._amax(prefix)
        if act is None or act.dynamic or amax is None:
            return None
        if not amax >= 0 or amax == float("inf"):
            raise NumericsError(f"{prefix}: calibration amax {amax} is not a finite non-negative number")
        # Symmetric range / 2 as compressed-tensors computes it: 896 / 2 for fp8, 255 / 2 for int8.
        half_range = 448.0 if act.type == "fp8_e4m3" else 127.5
        scale = torch.tensor(amax / half_range, dtype=torch.float64).to(self._model_dtype)
        if float(scale) == 0.0:  # the library replaces zero scales by the dtype's epsilon
            scale = torch.tensor(torch.finfo(self._model_dtype).eps, dtype=self._model_dtype)
        return scale.to(torch.float32)

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        weight.validate(prefix)
        spec, dtype = weight.spec, self._model_dtype
        if spec != self.spec:
            # the config written next to these tensors describes self.spec only
            raise UnsupportedError(
                f"{prefix}: a {spec.describe()} weight cannot be written as this {self.format} scheme "
                f"({self.spec.describe()}); quantize it with the writer's spec_for"
            )
        n, k = weight.shape
        lead = weight.lead
        out: dict[str, Tensor] = {}
        stored_scale = _stored_scale_shape(spec, (n, k), lead)
        if spec.is_uint:
            out[f"{prefix}.weight_packed"] = pack_bits(weight.data, spec.bits)  # along K
            out[f"{prefix}.weight_scale"] = weight.scale.to(dtype).reshape(stored_scale)
            out[f"{prefix}.weight_shape"] = torch.tensor([*lead, n, k], dtype=torch.int64)
            if weight.zero is not None:
                # stored u = signed zero + 2^(b-1) = the canonical zero, packed along N
                zero = weight.zero.reshape(stored_scale).to(torch.uint8)
                out[f"{prefix}.weight_zero_point"] = pack_bits(zero, spec.bits, dim=-2)
        else:
            out[f"{prefix}.weight"] = weight.data
            out[f"{prefix}.weight_scale"] = weight.scale.to(dtype).reshape(stored_scale)
            if weight.zero is not None:
                out[f"{prefix}.weight_zero_point"] = weight.zero.to(torch.int8).reshape(stored_scale)
        act = spec.act
        if act is not None and not act.dynamic:
            if weight.input_scale is None:
                raise TensorError(f"{prefix}.input_scale", "static activation scheme without an input scale")
            out[f"{prefix}.input_scale"] = weight.input_scale.to(dtype).reshape(*lead, 1)
            if weight.input_zero is not None:
                out[f"{prefix}.input_zero_point"] = weight.input_zero.to(torch.int8).reshape(*lead, 1)
        return out

    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        # The library lists every unquantized Linear in model order; lm_head comes last.
        ignore = list(dict.fromkeys(skipped))
        if not self._quantized_lm_head and "lm_head" not in ignore:
            ignore.append("lm_head")
        group = {
            "format": self.format,
            "input_activations": copy.deepcopy(self.preset.acts),
            "output_activations": None,
            "targets": ["Linear"],
            "weights": copy.deepcopy(self.preset.weights),
        }
        return {
            "config_groups": {"group_0": group},
            "format": self.format,
            "global_compression_ratio": None,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "moe_sparsity_config": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": WRITTEN_VERSION,
        }


def _stored_scale_shape(spec: QuantSpec, shape: tuple[int, int], lead: tuple[int, ...]) -> tuple[int, ...]:
    """On-disk scale shape: tensor [1], channel [N, 1], group [N, ng], block [nb, kb]."""
    if spec.granularity == "tensor":
        return (*lead, 1)
    if spec.granularity == "channel":
        return (*lead, shape[0], 1)
    return (*lead, *expected_scale_shape(spec, shape))
