"""compressed-tensors reader: which layers are quantized and how, and their byte layouts decoded.

Tensor presence decides whether a layer is quantized (formats.md §1.3); the config (config.py)
only says how. Decodes `pack-quantized`, `int-quantized`, `float-quantized` and
`naive-quantized` layers into the canonical `QuantWeight`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import QuantConfigError, TensorError
from anyquant.quant.formats.base import (
    HeaderIndex,
    QuantFormat,
    StoredNames,
    require_dtype,
    require_layer_shape,
    require_shape,
)
from anyquant.quant.formats.compressed_tensors.config import (
    _DENSE_FORMATS,
    _FLOAT_DTYPES,
    _QUANT_FORMATS,
    _STATUSES,
    ConfigGroup,
    QuantArgs,
    _check_format,
    _compile_target,
    _fail,
    _is_empty,
    _parse_version,
    act_quant,
    parse_group,
    spec_from_args,
)
from anyquant.quant.formats.compressed_tensors.tensors import (
    _INT_DTYPES,
    _canonical_scale,
    _get,
    _group_index,
    _group_index_layout,
    _input_scalar,
    _input_scalar_layout,
    _logical_shape,
    _match_scale_layout,
    _unpack,
)
from anyquant.quant.packing import packed_len
from anyquant.quant.registry import register_format
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight, expected_scale_shape, require_finite_codes
from anyquant.quant.weight_types import canonical_uint

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


@dataclass(frozen=True)
class _Layer:
    """What spec_for resolved for one prefix, kept for stored_names and decode."""

    spec: QuantSpec
    layout: str  # packed | int8 | fp8
    bits: int  # stored bits per code
    symmetric: bool  # as the config group says
    zero_stored: bool  # a weight_zero_point tensor is present
    input_zero_stored: bool


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
