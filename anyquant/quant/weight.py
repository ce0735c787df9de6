"""`QuantWeight`: the canonical in-memory form of one quantized weight.

Every format decodes into this and every kernel starts from it; sharding and padding operate on
it. It owns validation of its own tensors (shapes, dtypes, finite scales) and nothing else.

Layout (E = optional leading expert dimension, N = out_features, K = in_features):

| weight type | data                                   | scale (float32) by granularity                         |
|-------------|----------------------------------------|--------------------------------------------------------|
| uintN       | uint8 [E?, N, K], one code per byte    | channel [E?, N]; group [E?, N, ceil(K/G)]              |
| int8        | int8 [E?, N, K]                        | tensor [E?]; channel [E?, N]; group [E?, N, ceil(K/G)] |
| fp8_*       | float8 [E?, N, K]                      | tensor [E?]; channel [E?, N]; block [E?, ceil(N/Bn), ceil(K/Bk)] |

Why codes are unpacked (one byte each) rather than bit-packed: sharding, zero-padding and
act-order permutation become plain slicing on any bit width (3-bit included), every format has to
extract codes anyway, and kernels repack once at load into whatever they like. Only one layer is
ever held in this form at a time, so the extra transient memory is bounded.
`zero` is int32 with the same shape as `scale`, in code units (the true zero point, never the
GPTQ-v1 "minus one" or the compressed-tensors signed offset). `offset` (spec.has_offset only) is
float32 shaped like `scale`, added after scaling: GGUF's per-sub-block minimums.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from anyquant.errors import NumericsError, TensorError
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight_types import traits_of_dtype


def require_finite(name: str, values: Tensor, what: str = "scales") -> None:
    """Refuse NaN or Inf among float `values` (scales, offsets, input scales) of tensor `name`."""
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise NumericsError(f"tensor {name!r}: {bad} of {values.numel()} {what} are NaN or Inf")


def require_finite_codes(name: str, data: Tensor) -> None:
    """Refuse fp8 weight codes that are NaN or Inf, told by their bit pattern (no float copy of a
    whole weight); the pattern of each fp8 type is its `nonfinite_mask` (weight_types.py).
    Integer codes are always finite."""
    traits = traits_of_dtype(data.dtype)
    if traits is None or traits.nonfinite_mask is None or not data.numel():
        return
    mask = traits.nonfinite_mask
    bad = int(((data.view(torch.uint8) & mask) == mask).sum())
    if bad:
        raise NumericsError(f"tensor {name!r}: {bad} of {data.numel()} fp8 weight codes are NaN or Inf")


def code_dtype(spec: QuantSpec) -> torch.dtype:
    return spec.traits.code_dtype


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) if group_size else 0


def expected_scale_shape(spec: QuantSpec, shape: tuple[int, int]) -> tuple[int, ...]:
    """Scale shape (without the expert dimension) for a logical [N, K] weight."""
    n, k = shape
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "channel":
        return (n,)
    if spec.granularity == "group":
        return (n, num_groups(k, spec.group_size))
    bn, bk = spec.block_shape
    return (-(-n // bn), -(-k // bk))


@dataclass
class QuantWeight:
    spec: QuantSpec
    shape: tuple[int, int]  # logical (out_features, in_features) of one expert / the layer
    data: Tensor
    scale: Tensor
    zero: Tensor | None = None
    group_index: Tensor | None = None  # [E?, K] int32, act-order only
    input_scale: Tensor | None = None  # static activation scale, float32 [E?]
    input_zero: Tensor | None = None  # static asymmetric activation zero point, int32 [E?]
    offset: Tensor | None = None  # float32 like scale, spec.has_offset only (added after scaling)

    @property
    def num_experts(self) -> int | None:
        return self.data.shape[0] if self.data.dim() == 3 else None

    @property
    def lead(self) -> tuple[int, ...]:
        return (self.data.shape[0],) if self.data.dim() == 3 else ()

    def nbytes(self) -> int:
        """Bytes this weight needs when bit-packed (what a packing kernel keeps in memory)."""
        codes = self.data.numel() * self.spec.bits // 8
        extras = [self.scale, self.zero, self.group_index, self.input_scale, self.input_zero, self.offset]
        return codes + sum(t.numel() * t.element_size() for t in extras if t is not None)

    def validate(self, name: str) -> QuantWeight:
        """Check shapes, dtypes, code range and finite scales; raise naming `name`. Returns self."""
        spec, lead = self.spec, self.lead
        want = (*lead, *self.shape)
        if tuple(self.data.shape) != want:
            raise TensorError(name, f"codes have shape {list(self.data.shape)}, expected {list(want)}")
        if self.data.dtype != code_dtype(spec):
            raise TensorError(name, f"codes have dtype {self.data.dtype}, expected {code_dtype(spec)}")
        want_scale = (*lead, *expected_scale_shape(spec, self.shape))
        if spec.act_order and self.scale.dim() == len(want_scale) and self.scale.shape[-1] >= 1:
            # Columns reach their group through group_index, so the group count is free: a
            # tensor-parallel row shard keeps just the groups its columns use (formats.md §10.2).
            want_scale = (*want_scale[:-1], int(self.scale.shape[-1]))
        if tuple(self.scale.shape) != want_scale:
            raise TensorError(
                name,
                f"scale has shape {list(self.scale.shape)}, expected {list(want_scale)} for {spec.describe()}",
            )
        if self.scale.dtype != torch.float32:
            raise TensorError(name, f"canonical scale must be float32, got {self.scale.dtype}")
        require_finite(name, self.scale)
        if spec.has_zero:
            if self.zero is None or tuple(self.zero.shape) != want_scale:
                got = None if self.zero is None else list(self.zero.shape)
                raise TensorError(name, f"zero points have shape {got}, expected {list(want_scale)}")
            lo, hi = int(spec.traits.code_min), int(spec.traits.code_max)
            if self.zero.numel() and (int(self.zero.min()) < lo or int(self.zero.max()) > hi):
                raise TensorError(name, f"zero points outside [{lo}, {hi}]")
        elif self.zero is not None:
            raise TensorError(name, "zero points present for a symmetric spec")
        if spec.has_offset:
            if (
                self.offset is None
                or tuple(self.offset.shape) != want_scale
                or self.offset.dtype != torch.float32
            ):
                found = "absent" if self.offset is None else f"{self.offset.dtype} {list(self.offset.shape)}"
                raise TensorError(name, f"offsets are {found}, expected float32 {list(want_scale)}")
            require_finite(name, self.offset, "offsets")
        elif self.offset is not None:
            raise TensorError(name, "offsets present for a spec without has_offset")
        if spec.is_uint and self.data.numel() and int(self.data.max()) > spec.traits.code_max:
            raise TensorError(name, f"codes exceed {spec.bits} bits")
        if spec.act_order:
            gi = self.group_index
            if gi is None or tuple(gi.shape) != (*lead, self.shape[1]):
                raise TensorError(name, f"act-order needs a group index of shape {[*lead, self.shape[1]]}")
            ng = int(self.scale.shape[-1])
            if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= ng):
                raise TensorError(name, f"group index values outside [0, {ng})")
        if spec.act is not None and not spec.act.dynamic and self.input_scale is None:
            raise TensorError(name, "static activation quantization needs an input scale")
        if self.input_scale is not None:
            require_finite(name, self.input_scale, "input scales")
        return self

    def with_spec(self, spec: QuantSpec) -> QuantWeight:
        return replace(self, spec=spec)


_WEIGHT_TENSORS = ("data", "scale", "zero", "group_index", "input_scale", "input_zero", "offset")


def weight_to_device(weight: QuantWeight | Tensor, device: torch.device) -> QuantWeight | Tensor:
    """The same weight with every tensor on `device`; dtypes unchanged (codes stay codes)."""
    if isinstance(weight, Tensor):
        return weight.to(device)
    moved = {a: getattr(weight, a).to(device) for a in _WEIGHT_TENSORS if getattr(weight, a) is not None}
    return replace(weight, **moved)
