"""HF fine-grained FP8 (`quant_method: "fp8"`, block and per-tensor) and `fbgemm_fp8`: read and write.

Owns formats.md §5 and §6: which layers are stored as F8_E4M3 `weight` plus a multiplier scale
(`weight_scale_inv` blocks, a per-tensor scalar, or fbgemm's per-row `weight_scale`), their
translation into canonical fp8 `QuantWeight`s, and writing them back the way transformers,
AutoFP8/vLLM and fbgemm lay them out. What activations do is only described (`ActQuant`);
kernels implement it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
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
    require_dtype,
    require_layer_shape,
    require_shape,
)
from anyquant.quant.registry import register_format, register_writer
from anyquant.quant.spec import ActQuant, Granularity, LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight, require_finite, require_finite_codes
from anyquant.quant.weight_types import weight_traits

# Scales are dequantization multipliers in every dtype below (formats.md §11.10).
_FLOAT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ue8m0 scales: one exponent byte e per block meaning 2^(e - 127), stored as F8_E8M0 or raw U8.
_UE8M0_DTYPES = (torch.float8_e8m0fnu, torch.uint8)
_FMT_E4M3 = ("e4m3", "e4m3fn", "float8_e4m3fn")
# FP8 KV-cache scales ride along in some fp8 checkpoints (formats.md §5.2); anyquant does not use them.
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")


# -- shared helpers (also used by the lmdeploy format) ----------------------------------------------


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_lead(name: str, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, int]]:
    """[N, K] or stacked experts [E, N, K] -> ((E,) or (), (N, K))."""
    if len(shape) not in (2, 3):
        raise TensorError(name, f"shape {list(shape)}: expected [out, in] or [experts, out, in]")
    return tuple(shape[:-2]), (int(shape[-2]), int(shape[-1]))


def float_scale(name: str, tensor: Tensor, *, ue8m0: bool = False) -> Tensor:
    """A stored scale as float32; `ue8m0` also accepts F8_E8M0 and U8 exponent bytes."""
    allowed = _FLOAT_SCALE_DTYPES + (_UE8M0_DTYPES if ue8m0 else ())
    require_dtype(name, tensor, *allowed)
    if tensor.dtype == torch.uint8:
        # The byte is the E8M0 bit pattern: 2^(e - 127), 255 = NaN (caught by require_finite).
        tensor = tensor.view(torch.float8_e8m0fnu)
    return tensor.to(torch.float32)


def get_stored(stored: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in stored:
        raise TensorError(name, "missing from the stored tensors of this layer")
    return stored[name]


def is_scalar_shape(shape: Sequence[int], lead: tuple[int, ...]) -> bool:
    """Per-tensor scale shapes: [] or [1] (or [E] / [E, 1] for stacked experts)."""
    return tuple(shape) in ((*lead,), (*lead, 1))


def scalar_per_lead(name: str, tensor: Tensor, lead: tuple[int, ...]) -> Tensor:
    if not is_scalar_shape(tensor.shape, lead):
        want = " or ".join(str(list(s)) for s in ((*lead,), (*lead, 1)))
        raise TensorError(name, f"shape {list(tensor.shape)}, expected a per-tensor scale {want}")
    return tensor.reshape(lead)


def skip_list(qconfig: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The first present skip list among `keys`, validated as a list of strings."""
    for key in keys:
        value = qconfig.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise QuantConfigError(f"quantization_config.{key} must be a list of module names, got {value!r}")
        return list(value)
    return []


def listed(prefix: str, entries: Sequence[str], *, substring: bool = False) -> bool:
    """Whether any skip-list entry names `prefix` under the producers' rules (formats.md §1.3:
    exact, suffix, module-and-below, anchored regex; `substring` for AutoAWQ / lmdeploy lists).
    Used only to warn: tensor presence decides what is quantized."""
    for entry in entries:
        if prefix == entry or prefix.endswith("." + entry) or prefix.startswith(entry + "."):
            return True
        if substring and entry in prefix:
            return True
        try:
            if re.match(rf"(?:{entry})(?:\.|$)", prefix):
                return True
        except re.error:
            continue
    return False


def note_listed_but_quantized(
    fmt: QuantFormat, prefix: str, entries: Sequence[str], key: str, *, substring: bool = False
) -> None:
    if entries and listed(prefix, entries, substring=substring):
        fmt.note(f"{prefix} is listed in {key} but stored quantized; using the tensors")


# -- readers ----------------------------------------------------------------------------------------


class _Fp8Reader(QuantFormat):
    """Shared by the fp8 and fbgemm_fp8 readers: marker detection and the ignored KV-cache scales."""

    skip_keys: ClassVar[tuple[str, ...]] = ("modules_to_not_convert",)

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        self.skip = skip_list(qconfig, self.skip_keys)

    def ignored_tensor(self, name: str) -> bool:
        """True for tensors that belong to no linear layer and that anyquant deliberately leaves
        unused: FP8 KV-cache scales (`k_scale`, `v_scale`, legacy `kv_scale`). The loader's
        strict unused-tensor check asks this."""
        return name.endswith(_KV_SCALE_SUFFIXES)

    def _marker(self, prefix: str, kind: LayerKind, scale_names: Sequence[str]) -> str | None:
        """Name of the present weight scale when `prefix` is stored as fp8, else None.
        Raises when the tensors contradict each other."""
        weight = self.index.get(f"{prefix}.weight")
        scales = [n for n in scale_names if self.index.has_data(n)]
        if weight is None or weight.numel == 0:
            return None  # tied or absent: the loader decides
        if weight.dtype != "F8_E4M3":
            if weight.dtype in ("F8_E5M2", "I8"):
                raise TensorError(weight.name, f"dtype {weight.dtype}; {self.name} stores weights as F8_E4M3")
            if scales:
                raise TensorError(scales[0], f"present but {weight.name} is {weight.dtype}, not F8_E4M3")
            return None
        if not scales:
            want = " or ".join(n.rsplit(".", 1)[1] for n in scale_names)
            raise TensorError(
                weight.name, f"F8_E4M3 weight without a (non-empty) {want} scale in {self.source}"
            )
        if len(scales) > 1:
            raise TensorError(scales[0], f"both {scales[0]!r} and {scales[1]!r} present; expected one scale")
        if kind == "embedding":
            raise UnsupportedError(
                f"{prefix}: fp8-quantized embeddings are not supported (modules_to_convert)"
            )
        note_listed_but_quantized(self, prefix, self.skip, "/".join(self.skip_keys))
        return scales[0]


@register_format("fp8")
class Fp8Format(_Fp8Reader):
    """HF fine-grained FP8: `weight_block_size` present -> block scales `weight_scale_inv`
    [ceil(N/bn), ceil(K/bk)] (DeepSeek-V3/R1, Qwen3-FP8); absent -> one scalar `weight_scale`
    or `weight_scale_inv` per layer (AutoFP8 / vLLM / transformers). Both scale names multiply.

    `scale_fmt: "ue8m0"` block scales may be F8_E8M0 or U8 exponent bytes (2^(e - 127)); the
    setting is kept in `spec.extra`. DeepSeek-style kernels also round *activation* scales to
    powers of two under ue8m0; `ActQuant` does not model that (UNVERIFIED for real repos).
    `modules_to_not_convert` / `ignored_layers` are hints only (mismatches become notes)."""

    name = "fp8"
    skip_keys = ("modules_to_not_convert", "ignored_layers", "not_convert")
    marker_suffixes = (".weight_scale_inv", ".weight_scale")

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        fmt = qconfig.get("fmt", "e4m3")
        if not isinstance(fmt, str) or fmt.lower() not in _FMT_E4M3:
            raise QuantConfigError(
                f"{source}: quantization_config.fmt = {fmt!r}; anyquant reads fp8 checkpoints with fmt 'e4m3' only"
            )
        scheme = qconfig.get("activation_scheme", "dynamic")
        if not isinstance(scheme, str) or scheme.lower() not in ("dynamic", "static"):
            raise QuantConfigError(
                f"{source}: quantization_config.activation_scheme = {scheme!r}; expected 'dynamic' or 'static'"
            )
        self.static = scheme.lower() == "static"
        block = qconfig.get("weight_block_size")
        self.block = (
            None if block is None else _block_size(block, f"{source}: quantization_config.weight_block_size")
        )
        scale_fmt = qconfig.get("scale_fmt") or "float"
        if scale_fmt not in ("float", "ue8m0"):
            raise QuantConfigError(
                f"{source}: quantization_config.scale_fmt = {scale_fmt!r}; expected 'float' or 'ue8m0'"
            )
        self.scale_fmt: str = scale_fmt
        expert_dtype = qconfig.get("expert_dtype") or "fp8"
        if expert_dtype != "fp8":
            raise QuantConfigError(
                f"{source}: quantization_config.expert_dtype = {expert_dtype!r}; only 'fp8' experts are "
                "supported (FP4-packed experts are a different layout)"
            )

    def describe(self) -> str:
        layout = f"block {self.block[0]}x{self.block[1]}" if self.block else "per-tensor"
        extra = ", ue8m0 scales" if self.scale_fmt == "ue8m0" else ""
        acts = "static" if self.static else "dynamic"
        return f"fp8 e4m3 {layout}{extra}, {acts} fp8 activations"

    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        scale_name = self._marker(prefix, kind, (f"{prefix}.weight_scale_inv", f"{prefix}.weight_scale"))
        if scale_name is None:
            return None
        lead, (n, k) = split_lead(f"{prefix}.weight", self.index.info(f"{prefix}.weight").shape)
        scale = self.index.info(scale_name)
        ue8m0 = scale.dtype in ("F8_E8M0", "U8")
        if ue8m0 and self.scale_fmt != "ue8m0":
            self.note(
                f"{scale_name} is {scale.dtype} (ue8m0 exponents) although scale_fmt is {self.scale_fmt!r}"
            )
        granularity: Granularity
        if is_scalar_shape(scale.shape, lead):
            granularity, block = "tensor", (0, 0)
        elif self.block is not None and scale_name.endswith(".weight_scale_inv"):
            granularity, block = "block", self.block
            want = (*lead, cdiv(n, block[0]), cdiv(k, block[1]))
            if tuple(scale.shape) != want:
                raise TensorError(
                    scale_name,
                    f"shape {list(scale.shape)}, expected {list(want)} for a {[*lead, n, k]} weight "
                    f"with weight_block_size {list(block)}",
                )
        else:
            raise TensorError(
                scale_name,
                f"shape {list(scale.shape)}: expected a per-tensor scale [] or [1]"
                + ("" if self.block else " (no weight_block_size in the config, so no block scales)"),
            )
        act = self._act_quant(prefix, granularity, block)
        extra = (("scale_fmt", "ue8m0"),) if ue8m0 or self.scale_fmt == "ue8m0" else ()
        return QuantSpec("fp8_e4m3", granularity, block_shape=block, act=act, extra=extra)

    def _act_quant(self, prefix: str, granularity: str, block: tuple[int, int]) -> ActQuant:
        inputs = [n for n in self._input_names(prefix) if self.index.has_data(n)]
        if self.static:
            if not inputs:
                raise TensorError(
                    f"{prefix}.activation_scale",
                    "missing: activation_scheme is 'static' but neither activation_scale nor input_scale is stored",
                )
            if len(inputs) > 1:
                raise TensorError(inputs[0], f"both {inputs[0]!r} and {inputs[1]!r} present; expected one")
            return ActQuant("fp8_e4m3", dynamic=False, granularity="tensor")
        if inputs:
            self.note(f"{inputs[0]} ignored: activation_scheme is 'dynamic'")
        if granularity == "block":
            # One scale per token per block-K group of input channels, matching the weight blocks.
            return ActQuant("fp8_e4m3", dynamic=True, granularity="group", group_size=block[1])
        return ActQuant("fp8_e4m3", dynamic=True, granularity="tensor")

    @staticmethod
    def _input_names(prefix: str) -> tuple[str, str]:
        # transformers writes activation_scale; AutoFP8 / vLLM write input_scale.
        return (f"{prefix}.activation_scale", f"{prefix}.input_scale")

    def _scale_name(self, prefix: str) -> str:
        name = f"{prefix}.weight_scale_inv"
        return name if self.index.has_data(name) else f"{prefix}.weight_scale"

    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        required = [f"{prefix}.weight", self._scale_name(prefix)]
        inputs = self._input_names(prefix)
        if spec.act is not None and not spec.act.dynamic:
            present = [n for n in inputs if self.index.has_data(n)]
            required.append(present[0] if present else inputs[0])
        optional = tuple(n for n in inputs if n not in required)
        return StoredNames(tuple(required), optional)

    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        self._layout(prefix, spec, stored, shape)

    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        data, scale, sname, input_scale, iname = self._layout(prefix, spec, stored)
        wname = f"{prefix}.weight"
        require_finite(sname, scale)
        require_finite_codes(wname, data)
        if input_scale is not None and iname is not None:
            require_finite(iname, input_scale, "input scales")
        shape = split_lead(wname, data.shape)[1]
        return QuantWeight(spec, shape, data, scale, input_scale=input_scale).validate(wname)

    def _layout(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], model: tuple[int, int] | None = None
    ) -> tuple[Tensor, Tensor, str, Tensor | None, str | None]:
        """Shape and dtype checks (no values read): (weight, float32 scale, its name, input scale
        and its name); with `model`, the weight must be exactly [out, in] = model."""
        wname = f"{prefix}.weight"
        data = get_stored(stored, wname)
        require_dtype(wname, data, torch.float8_e4m3fn)
        lead, shape = split_lead(wname, data.shape)
        if model is not None:
            require_layer_shape(wname, data, model, "[out, in]", model)
        sname = next(
            (
                n
                for n in (f"{prefix}.weight_scale_inv", f"{prefix}.weight_scale")
                if n in stored and stored[n].numel()
            ),
            f"{prefix}.weight_scale_inv",
        )
        scale = float_scale(sname, get_stored(stored, sname), ue8m0=spec.granularity == "block")
        if spec.granularity == "block":
            bn, bk = spec.block_shape
            require_shape(
                sname,
                scale,
                (*lead, cdiv(shape[0], bn), cdiv(shape[1], bk)),
                f"blocks of {bn}x{bk} over a {list(lead) + list(shape)} weight",
            )
        elif spec.granularity == "tensor":
            scale = scalar_per_lead(sname, scale, lead)
        else:
            raise UnsupportedError(
                f"{prefix}: fp8 format has no {spec.granularity} scales ({spec.describe()})"
            )
        input_scale, iname = None, None
        if spec.act is not None and not spec.act.dynamic:
            iname = next((n for n in self._input_names(prefix) if n in stored and stored[n].numel()), None)
            if iname is None:
                raise TensorError(
                    f"{prefix}.activation_scale", "missing: static activations need a stored scale"
                )
            input_scale = scalar_per_lead(iname, float_scale(iname, stored[iname]), lead)
        return data, scale, sname, input_scale, iname


def _block_size(value: Any, what: str) -> tuple[int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise QuantConfigError(f"{what} = {value!r}; expected two positive integers [out, in]")
    return int(value[0]), int(value[1])


@register_format("fbgemm_fp8")
class FbgemmFp8Format(_Fp8Reader):
    """fbgemm_fp8 (Meta Llama-3.1-405B-FP8): F8_E4M3 `weight` with a per-row multiplier
    `weight_scale` [N, 1]; activations dynamic per-token fp8 whose row amax is clamped to
    `activation_scale_ub` (kept in `activation_scale_ub` and in each spec's `extra`; the exact
    clamp semantics are UNVERIFIED, formats.md §6)."""

    name = "fbgemm_fp8"
    marker_suffixes = (".weight_scale",)

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        ub = qconfig.get("activation_scale_ub", 1200.0)  # transformers' FbgemmFp8Config default
        if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not math.isfinite(ub) or ub <= 0:
            raise QuantConfigError(
                f"{source}: quantization_config.activation_scale_ub = {ub!r}; expected a positive number"
            )
        self.activation_scale_ub = float(ub)

    def describe(self) -> str:
        return f"fbgemm_fp8 e4m3 per-row, dynamic per-token fp8 activations (amax ub {self.activation_scale_ub:g})"

    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        scale_name = self._marker(prefix, kind, (f"{prefix}.weight_scale",))
        if scale_name is None:
            return None
        wshape = self.index.info(f"{prefix}.weight").shape
        if len(wshape) != 2:
            raise UnsupportedError(
                f"{prefix}: fbgemm_fp8 weight of shape {list(wshape)}; stacked (Llama-4 style) experts are not supported"
            )
        want = (wshape[0], 1)
        if tuple(self.index.info(scale_name).shape) != want:
            raise TensorError(
                scale_name,
                f"shape {list(self.index.info(scale_name).shape)}, expected {list(want)} (per row)",
            )
        return QuantSpec(
            "fp8_e4m3",
            "channel",
            act=ActQuant("fp8_e4m3", dynamic=True, granularity="token"),
            extra=(("activation_scale_ub", f"{self.activation_scale_ub:g}"),),
        )

    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        return StoredNames((f"{prefix}.weight", f"{prefix}.weight_scale"))

    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        self._layout(prefix, stored, shape)

    def _layout(
        self, prefix: str, stored: Mapping[str, Tensor], model: tuple[int, int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Shape and dtype checks (no values read): the weight and its float32 [N, 1] scale."""
        wname, sname = f"{prefix}.weight", f"{prefix}.weight_scale"
        data = get_stored(stored, wname)
        require_dtype(wname, data, torch.float8_e4m3fn)
        if data.dim() != 2:
            raise TensorError(wname, f"shape {list(data.shape)}, expected [out, in]")
        if model is not None:
            require_layer_shape(wname, data, model, "[out, in]", model)
        scale = float_scale(sname, get_stored(stored, sname))
        require_shape(sname, scale, (data.shape[0], 1), "one multiplier per output row")
        return data, scale

    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        wname, sname = f"{prefix}.weight", f"{prefix}.weight_scale"
        data, scale = self._layout(prefix, stored)
        n, k = data.shape
        scale = scale.reshape(n)
        require_finite(sname, scale)
        require_finite_codes(wname, data)
        return QuantWeight(spec, (n, k), data, scale).validate(wname)


# -- writers ----------------------------------------------------------------------------------------


class _Fp8Writer(FormatWriter):
    """Shared by the fp8 writers: F32 scales, e4m3 codes, the activation options they accept."""

    acts: ClassVar[tuple[str | None, ...]] = (None, "fp8-dynamic")

    def __init__(self, options: WriteOptions) -> None:
        super().__init__(options)
        if options.act not in self.acts:
            known = ", ".join(a for a in self.acts if a) or "none"
            raise UnsupportedError(
                f"format {self.name!r} cannot write activations {options.act!r}; it writes: {known}"
            )

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # every fp8 producer here stores F32 scales

    def _kind_reason(self, kind: LayerKind) -> str | None:
        # lm_head is quantized when the user asks for it (readers accept it); embeddings never are.
        return f"{self.name} does not quantize embeddings" if kind == "embedding" else None

    def _check(self, prefix: str, weight: QuantWeight, granularity: str) -> None:
        spec = weight.spec
        if spec.weight != "fp8_e4m3" or spec.granularity != granularity:
            raise UnsupportedError(
                f"{prefix}: {self.name} writes fp8_e4m3 {granularity} weights, not {spec.describe()}"
            )


@register_writer
class Fp8BlockWriter(_Fp8Writer):
    """transformers' fine-grained FP8: `weight` + `weight_scale_inv` F32 blocks (128x128 default,
    `options.block_size`), amax/448 per block, dynamic per-token-per-block activations. Ragged
    edge blocks are written like DeepSeek-V3's (transformers' own quantizer skips such layers)."""

    name = "fp8-block"

    def __init__(self, options: WriteOptions) -> None:
        super().__init__(options)
        self.block = _block_size(list(options.block_size), "block size")

    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        reason = self._kind_reason(kind)
        if reason is not None:
            return reason
        act = ActQuant("fp8_e4m3", dynamic=True, granularity="group", group_size=self.block[1])
        return QuantSpec("fp8_e4m3", "block", block_shape=self.block, act=act)

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        self._check(prefix, weight, "block")
        return {f"{prefix}.weight": weight.data, f"{prefix}.weight_scale_inv": weight.scale.float()}

    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block),
        }
        if skipped:
            config["modules_to_not_convert"] = list(skipped)
        return config


@register_writer
class Fp8TensorWriter(_Fp8Writer):
    """Per-tensor FP8 the AutoFP8 / vLLM way: `weight` + scalar `weight_scale` F32 [], and with
    static activations (`options.act == "fp8-static"`) a scalar `input_scale` = calibration amax/448
    from `options.extra["act_amax"][prefix]`; skipped layers (lm_head included) go to `ignored_layers`."""

    name = "fp8"
    acts = (None, "fp8-dynamic", "fp8-static")

    @property
    def static(self) -> bool:
        return self.options.act == "fp8-static"

    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        reason = self._kind_reason(kind)
        if reason is not None:
            return reason
        return QuantSpec(
            "fp8_e4m3", "tensor", act=ActQuant("fp8_e4m3", dynamic=not self.static, granularity="tensor")
        )

    def input_scale(self, prefix: str) -> Tensor | None:
        if not self.static:
            return None
        amax_by_prefix = self.options.extra.get("act_amax") or {}
        if prefix not in amax_by_prefix:
            return None
        amax = torch.as_tensor(amax_by_prefix[prefix], dtype=torch.float32).reshape(())
        require_finite(f"act_amax[{prefix!r}]", amax, "calibration amax values")
        # An input that was always zero gets scale 1: any positive scale reproduces it exactly.
        return torch.where(amax > 0, amax / weight_traits("fp8_e4m3").code_max, torch.ones_like(amax))

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        self._check(prefix, weight, "tensor")
        out = {f"{prefix}.weight": weight.data, f"{prefix}.weight_scale": weight.scale.float()}
        if weight.spec.act is not None and not weight.spec.act.dynamic:
            if weight.input_scale is None:
                raise UnsupportedError(
                    f"{prefix}: static fp8 activations need an input scale (calibration amax)"
                )
            out[f"{prefix}.input_scale"] = weight.input_scale.float()
        return out

    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "quant_method": "fp8",
            "activation_scheme": "static" if self.static else "dynamic",
        }
        if skipped:
            config["ignored_layers"] = list(skipped)
        return config


@register_writer
class FbgemmFp8Writer(_Fp8Writer):
    """fbgemm_fp8 as transformers writes it: `weight` + per-row `weight_scale` F32 [N, 1] =
    amax_row/448; `activation_scale_ub` from `options.extra` (default 1200)."""

    name = "fbgemm-fp8"

    def __init__(self, options: WriteOptions) -> None:
        super().__init__(options)
        ub = options.extra.get("activation_scale_ub", 1200.0)
        if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not math.isfinite(ub) or ub <= 0:
            raise UnsupportedError(f"activation_scale_ub must be a positive number, got {ub!r}")
        self.activation_scale_ub = float(ub)

    def spec_for(self, prefix: str, shape: tuple[int, int], kind: LayerKind) -> QuantSpec | str:
        reason = self._kind_reason(kind)
        if reason is not None:
            return reason
        return QuantSpec(
            "fp8_e4m3",
            "channel",
            act=ActQuant("fp8_e4m3", dynamic=True, granularity="token"),
            extra=(("activation_scale_ub", f"{self.activation_scale_ub:g}"),),
        )

    def encode(self, prefix: str, weight: QuantWeight) -> dict[str, Tensor]:
        self._check(prefix, weight, "channel")
        if weight.data.dim() != 2:
            raise UnsupportedError(
                f"{prefix}: fbgemm-fp8 writes 2-D weights only, got {list(weight.data.shape)}"
            )
        return {
            f"{prefix}.weight": weight.data,
            f"{prefix}.weight_scale": weight.scale.float().reshape(-1, 1),
        }

    def quantization_config(self, skipped: list[str]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": self.activation_scale_ub,
        }
        if skipped:
            config["modules_to_not_convert"] = list(skipped)
        return config
