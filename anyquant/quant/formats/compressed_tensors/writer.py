"""compressed-tensors writer: canonical weights in the byte layouts and config llm-compressor writes.

The presets of the release it reproduces (`WRITTEN_VERSION`), options -> scheme, and the encoding
of every layout the reader decodes.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import NumericsError, TensorError, UnsupportedError
from anyquant.quant.formats.base import FormatWriter, WriteOptions
from anyquant.quant.formats.compressed_tensors.config import (
    _FLOAT_DTYPES,
    PRESETS,
    Preset,
    QuantArgs,
    _acts,
    _check_weights,
    _int_weights,
    parse_args,
    spec_from_args,
)
from anyquant.quant.packing import pack_bits
from anyquant.quant.registry import register_writer
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight, expected_scale_shape

# The `version` the writer stamps: the compressed-tensors release whose byte layout it reproduces and
# was checked against, not whatever library happens to be installed (the writer does not use the
# library). Readers, ours and the library's, use the version only to tell 0.17's padded sub-byte
# packing from the dense packing of every release since 0.18, so a later release reads it the same.
WRITTEN_VERSION = "0.20.0"


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
