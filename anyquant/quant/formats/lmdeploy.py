"""lmdeploy `lite smooth_quant` (`quant_method: "smooth_quant"`): W8A8 int8 / fp8, read and write.

Owns formats.md §7: `weight` (I8 / F8_E4M3 / F8_E5M2) plus a per-row multiplier `scale` F32
[N, 1], activations quantized dynamically per token to the same type. SmoothQuant factors are
already folded into the norms and the v/up projections, so nothing beyond the scales is applied.
lmdeploy's `lite auto_awq` output (`quant_method: "awq"`) belongs to the AWQ format, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from anyquant.errors import QuantConfigError, TensorError, UnsupportedError
from anyquant.quant.formats.base import (
    FormatWriter,
    HeaderIndex,
    QuantFormat,
    StoredNames,
    WriteOptions,
    require_layer_shape,
    require_shape,
)
from anyquant.quant.formats.fp8 import (
    float_scale,
    get_stored,
    note_listed_but_quantized,
    skip_list,
    split_lead,
)
from anyquant.quant.registry import register_format, register_writer
from anyquant.quant.spec import ActQuant, ActType, LayerKind, QuantSpec, WeightType
from anyquant.quant.weight import QuantWeight, require_finite, require_finite_codes
from anyquant.quant.weight_types import weight_traits

# quant_dtype -> (canonical weight type, activation type); how each is stored (safetensors and
# torch dtype) is the weight type's (weight_types.py).
_QUANT_DTYPES: dict[str, tuple[WeightType, ActType]] = {
    "int8": ("int8", "int8"),
    "float8_e4m3fn": ("fp8_e4m3", "fp8_e4m3"),
    "float8_e5m2": ("fp8_e5m2", "fp8_e5m2"),
}
_QUANT_STORAGE = tuple(str(weight_traits(w).stored_dtype) for w, _ in _QUANT_DTYPES.values())
# MoE routers lmdeploy keeps in float (formats.md §9.3).
_ROUTER_SUFFIXES = (".mlp.gate", ".block_sparse_moe.gate", ".shared_expert_gate")


def _spec(quant_dtype: str) -> QuantSpec:
    weight, act = _QUANT_DTYPES[quant_dtype]
    # lmdeploy: per-token s = max(amax_row, 1e-7) / qmax, same type as the weights.
    return QuantSpec(weight, "channel", act=ActQuant(act, dynamic=True, granularity="token"))


@register_format("smooth_quant")
class LmdeploySmoothQuantFormat(QuantFormat):
    """lmdeploy smooth_quant: per-row symmetric `weight` * `scale[n, 0]`; every decoder linear is
    converted, embeddings / lm_head / norms stay plain (tensor presence decides per layer)."""

    name = "smooth_quant"

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        quant_dtype = qconfig.get("quant_dtype")
        if quant_dtype is None:
            # Releases that only did int8 may not write the key (UNVERIFIED); int8 is what they made.
            quant_dtype = "int8"
            self.note(f"{source}: no quant_dtype in quantization_config; assuming int8")
        if not isinstance(quant_dtype, str) or quant_dtype not in _QUANT_DTYPES:
            raise QuantConfigError(
                f"{source}: quantization_config.quant_dtype = {quant_dtype!r}; expected one of "
                f"{', '.join(_QUANT_DTYPES)}"
            )
        self.quant_dtype: str = quant_dtype
        self.skip = skip_list(qconfig, ("modules_to_not_convert",))

    def describe(self) -> str:
        weight, act = _QUANT_DTYPES[self.quant_dtype]
        return f"lmdeploy smooth_quant: {weight} per-channel, dynamic per-token {act} activations"

    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        weight = self.index.get(f"{prefix}.weight")
        scale_name = f"{prefix}.scale"
        has_scale = self.index.has_data(scale_name)
        if weight is None or weight.numel == 0:
            return None  # tied or absent: the loader decides
        if weight.dtype not in _QUANT_STORAGE:
            if has_scale:
                raise TensorError(
                    scale_name, f"present but {weight.name} is {weight.dtype}, not a quantized dtype"
                )
            return None
        want_dtype = weight_traits(_QUANT_DTYPES[self.quant_dtype][0]).stored_dtype
        if weight.dtype != want_dtype:
            raise TensorError(
                weight.name, f"dtype {weight.dtype}, but quant_dtype {self.quant_dtype!r} stores {want_dtype}"
            )
        if not has_scale:
            raise TensorError(
                scale_name, f"missing (or empty): {weight.name} is {weight.dtype} and needs its scale"
            )
        if kind == "embedding":
            raise UnsupportedError(f"{prefix}: quantized embeddings are not part of lmdeploy smooth_quant")
        lead, (n, _) = split_lead(weight.name, weight.shape)
        scale_shape = self.index.info(scale_name).shape
        if tuple(scale_shape) != (*lead, n, 1):
            raise TensorError(
                scale_name, f"shape {list(scale_shape)}, expected {[*lead, n, 1]} (one scale per row)"
            )
        # lmdeploy matches its skip list by substring (formats.md §1.3).
        note_listed_but_quantized(self, prefix, self.skip, "modules_to_not_convert", substring=True)
        return _spec(self.quant_dtype)

    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        return StoredNames((f"{prefix}.weight", f"{prefix}.scale"))

    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        self._layout(prefix, stored, shape)

    def _layout(
        self, prefix: str, stored: Mapping[str, Tensor], model: tuple[int, int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Shape and dtype checks (no values read): the weight and its float32 [*, N, 1] scale;
        with `model`, the weight must be exactly [out, in] = model."""
        wname, sname = f"{prefix}.weight", f"{prefix}.scale"
        data = get_stored(stored, wname)
        torch_dtype = weight_traits(_QUANT_DTYPES[self.quant_dtype][0]).code_dtype
        if data.dtype != torch_dtype:
            raise TensorError(
                wname, f"dtype {data.dtype}, expected {torch_dtype} for quant_dtype {self.quant_dtype!r}"
            )
        lead, shape = split_lead(wname, data.shape)
        if model is not None:
            require_layer_shape(wname, data, model, "[out, in]", model)
        scale = float_scale(sname, get_stored(stored, sname))
        require_shape(sname, scale, (*lead, shape[0], 1), "one scale per output row")
        return data, scale

    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        wname = f"{prefix}.weight"
        data, scale = self._layout(prefix, stored)
        lead, shape = split_lead(wname, data.shape)
        scale = scale.reshape(*lead, shape[0])
        require_finite(f"{prefix}.scale", scale)
        if data.is_floating_point():
            require_finite_codes(wname, data)
        return QuantWeight(spec, shape, data, scale).validate(wname)


class _LmdeployWriter(FormatWriter):
    """smooth_quant with round-to-nearest per-channel weights and no smoothing (all factors 1):
    a valid smooth_quant checkpoint. lmdeploy's scale = amax_row / qmax, stored F32 [N, 1].
    `options.extra["quant_dtype"]` picks among `quant_dtypes` (the first is the default)."""

    quant_dtypes: ClassVar[tuple[str, ...]]

    def __init__(self, options: WriteOptions) -> None:
        super().__init__(options)
        chosen = options.extra.get("quant_dtype", self.quant_dtypes[0])
        if chosen not in self.quant_dtypes:
            raise UnsupportedError(
                f"format {self.name!r}: quant_dtype must be one of {', '.join(self.quant_dtypes)}, got {chosen!r}"
            )
        self.quant_dtype: str = chosen
        act = _QUANT_DTYPES[chosen][1]
        allowed = (None, f"{act.split('_')[0]}-dynamic")
        if options.act not in allowed:
            raise UnsupportedError(
                f"format {self.name!r} quantizes activations dynamically per token ({allowed[1]}); "
                f"got {options.act!r}"
            )
        self._never_converted: set[str] = set()  # lmdeploy does not list these in its skip list

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        if kind in ("embedding", "lm_head"):
            self._never_converted.add(prefix)
            return f"lmdeploy smooth_quant converts only decoder linears, not the {kind}"
        if prefix.endswith(_ROUTER_SUFFIXES):
            return "lmdeploy keeps MoE routers in float"
        return _spec(self.quant_dtype)

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        want = _spec(self.quant_dtype)
        if (weight.spec.weight, weight.spec.granularity, weight.spec.has_zero) != (
            want.weight,
            "channel",
            False,
        ):
            raise UnsupportedError(
                f"{prefix}: {self.name} writes {want.describe()}, not {weight.spec.describe()}"
            )
        scale = weight.scale.float().unsqueeze(-1)  # [E?, N] -> [E?, N, 1]
        return {f"{prefix}.weight": weight.data, f"{prefix}.scale": scale}

    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        config: dict[str, Any] = {"quant_method": "smooth_quant", "quant_dtype": self.quant_dtype}
        listed = [p for p in skipped if p not in self._never_converted]
        if listed:
            config["modules_to_not_convert"] = listed
        return config


@register_writer
class LmdeployInt8Writer(_LmdeployWriter):
    name = "lmdeploy-int8"
    quant_dtypes = ("int8",)


@register_writer
class LmdeployFp8Writer(_LmdeployWriter):
    """lmdeploy's `--quant-dtype fp8`, written as float8_e4m3fn (float8_e5m2 on request)."""

    name = "lmdeploy-fp8"
    quant_dtypes = ("float8_e4m3fn", "float8_e5m2")
