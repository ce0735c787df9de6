"""AVX512-VNNI kernel (`cpu_avx512_vnni`): integer weights times int8 activations (W4A8 / W8A8).

Serves every layer whose spec quantizes activations to int8 with one scale per row of x (dynamic)
or per tensor (static, symmetric), over uint2/3/4 (groups, with or without zero points or GGUF
float offsets), int8 and uint8 weights: W8A8 checkpoints (their own numerics: the int32 dot
products are exact, scales applied once in fp32) and weight-only checkpoints loaded with
`activation_dtype="int8"` (their spec then carries per-token int8 activations; see
loading/activations.py). Weights are repacked at load into the layout csrc/vnni.h
describes (16 output rows per block, 4-bit codes laid out so `& 0x0F` / `& 0xF0` unpack them in
registers); activations are quantized inside the same call, exactly as the reference's
`fake_quantize_activations` does, so the result equals the reference's definition up to fp32
rounding of the scales and the output. A MoE layer's routed experts on this kernel run as one
fused call over their stacked packed tensors (avx512_moe_vnni.py); each expert's kernel keeps
working on its slice.

Why int8 activations: vpdpbusd does 64 multiply-adds per instruction against vdpbf16ps's 32, and
unpacking int4 for it is two ANDs per 128 weights instead of a table lookup per 32, so one row
streams the weights at memory speed and many rows compute twice as fast (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from anyquant.errors import TensorError
from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.base import LinearKernel, check_weight, round_up
from anyquant.quant.kernels.torch_cpu import _act_order_permutation
from anyquant.quant.reference import activation_amax
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups
from anyquant.quant.weight_types import WEIGHT_TYPES

_V4, _V8 = 0, 1  # the extension's integer weight layouts
# Integer weight types by their layout in the weight-type table (quant/weight_types.py).
_FORMAT = {
    name: {"int4": _V4, "int8": _V8}[traits.cpu_layout]
    for name, traits in WEIGHT_TYPES.items()
    if traits.cpu_layout in ("int4", "int8")
}
_ROWS = 16  # output rows per block: 16 int32 lanes of vpdpbusd
_MAX_GROUP = 32768  # int32 sums stay exact (255 * 128 * 65536 < 2^31); half of that for margin
_DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def _cpu_reason() -> str | None:
    if not torch.cpu._is_avx512_supported():
        return "CPU lacks AVX-512 (F/BW/VL/DQ)"
    if not torch.cpu._is_avx512_bf16_supported():
        return "CPU lacks avx512_bf16"
    if not torch.cpu._is_vnni_supported():
        return "CPU lacks AVX512-VNNI (vpdpbusd)"
    return None


def activation_reason(spec: QuantSpec) -> str | None:
    """Why the spec's activations are not what this kernel quantizes, or None."""
    act = spec.act
    if act is None:
        return (
            "activations are not quantized (weight-only: cpu_avx512 runs it with bf16 dot products); "
            "--activation-dtype int8 / activation_dtype='int8' runs it here with int8 activations"
        )
    if act.type != "int8":
        return f"activations are {act.type}; this kernel quantizes them to int8"
    if act.dynamic and act.granularity == "group":
        return (
            f"dynamic per-group activation scales (group {act.group_size}); this kernel takes one per token"
        )
    if not act.dynamic and (act.granularity != "tensor" or not act.symmetric):
        return f"static {act.describe()} activations; static scales must be per-tensor and symmetric"
    return None


class Int8ActivationKernel(LinearKernel):
    """Integer weights x int8 activations over csrc/vnni.h's layout: the packing, the spec checks
    and the call, shared by the AVX512-VNNI kernel below and the AVX2 one (avx2_a8.py), which
    differ in the extension op (`op_name`) and the CPU they need (`cpu_reason`)."""

    op_name: str  # the extension op: the arguments of vnni_linear
    packed: Tensor
    scale: Tensor
    zero: Tensor | None
    offset: Tensor | None
    perm: Tensor | None

    device_types = ("cpu",)
    compute_dtypes = _DTYPES
    streamed_buffers = ("packed", "scale", "zero", "offset")

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        if spec.weight not in _FORMAT:
            return f"weights are {spec.weight}; this kernel runs uint2/3/4, int8 and uint8"
        reason = activation_reason(spec)
        if reason is not None:
            return reason
        if spec.granularity == "block":
            return "block-wise weight scales; this kernel takes per-group, per-channel or per-tensor"
        if round_up(shape[1], 8) > _MAX_GROUP and spec.granularity != "group":
            return f"in_features {shape[1]} per scale could overflow the int32 sums (limit {_MAX_GROUP})"
        if spec.granularity == "group" and spec.group_size > _MAX_GROUP:
            return f"groups of {spec.group_size} could overflow the int32 sums (limit {_MAX_GROUP})"
        return cls.cpu_reason() or cpu_ext.unavailable_reason()

    @classmethod
    def cpu_reason(cls) -> str | None:
        """Why this CPU cannot run the kernel's instructions, or None."""
        raise NotImplementedError

    def load(self, weight: QuantWeight | Tensor) -> None:
        weight = check_weight(weight, self)
        spec = weight.spec
        act = spec.act
        assert act is not None  # cannot_run refuses weight-only specs
        n, k = self.shape
        self.spec = spec
        self.dynamic_act = act if act.dynamic else None
        self.divisor = float(act.scale_divisor or 127.0)
        self.static_scale = 0.0
        if not act.dynamic:
            if weight.input_scale is None or weight.input_scale.numel() != 1:
                raise TensorError(
                    "input_scale", "static per-tensor activation quantization needs one input scale"
                )
            self.static_scale = float(weight.input_scale.float().reshape(()))
        self.fmt = _FORMAT[spec.weight]
        self.group = spec.group_size if spec.granularity == "group" else round_up(k, 8)
        ng = num_groups(k, self.group)
        self.k_pad, self.n_pad = ng * self.group, round_up(n, _ROWS)
        codes = weight.data
        perm = None
        if spec.act_order:
            perm = _act_order_permutation(weight.group_index, self.group, k)
            codes = codes[:, perm]
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("packed", self._pack(codes), persistent=False)
        scale = weight.scale.float()
        scale = scale.reshape(n, ng) if spec.granularity == "group" else scale.reshape(-1, 1).expand(n, ng)
        self.register_buffer("scale", self._blocked(scale, ng), persistent=False)
        # Codes are unsigned bytes in the kernel: int8 is stored as code + 128, so its zero is 128.
        self.zconst = 128 if spec.weight == "int8" else spec.implicit_zero
        zero = None
        if weight.zero is not None:
            zf = weight.zero.float().reshape(n, -1).expand(n, ng)
            if spec.weight == "int8":
                zf = zf + 128
            if not torch.equal(zf, zf.round()):
                raise TensorError("zero", "zero points must be integers for int8 dot products")
            zero = self._blocked(zf, ng).to(torch.int32)
        self.register_buffer("zero", zero, persistent=False)
        offset = None
        if weight.offset is not None:
            offset = self._blocked(weight.offset.float().reshape(n, ng), ng)
        self.register_buffer("offset", offset, persistent=False)
        cpu_ext.ops()  # raises with the reason if the library cannot be loaded

    def _blocked(self, t: Tensor, ng: int) -> Tensor:
        """[N, ng] -> [N_pad / 16, ng, 16] fp32 (padded rows 0)."""
        full = torch.zeros(self.n_pad, ng)
        full[: self.shape[0]] = t
        return full.view(-1, _ROWS, ng).transpose(1, 2).contiguous()

    def _pack(self, codes: Tensor) -> Tensor:
        """[N, K] codes -> [N_pad / 16, chunks, 64] bytes in csrc/vnni.h's layout."""
        n, k = self.shape
        raw = codes.view(torch.uint8) if codes.dtype != torch.uint8 else codes
        if self.spec.weight == "int8":
            raw = raw ^ 0x80  # code + 128 as an unsigned byte
        padded = torch.zeros(self.n_pad, self.k_pad, dtype=torch.uint8)
        padded[:n, :k] = raw  # padded inputs meet zero activations; padded rows are cut off
        nb = self.n_pad // _ROWS
        if self.fmt == _V4:
            c = padded.view(nb, _ROWS, self.k_pad // 8, 2, 4).permute(0, 2, 1, 3, 4)  # [nb, k/8, 16, 2, 4]
            return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(nb, self.k_pad // 8, 64).contiguous()
        c = padded.view(nb, _ROWS, self.k_pad // 4, 4).permute(0, 2, 1, 3)  # [nb, k/4, 16, 4]
        return c.reshape(nb, self.k_pad // 4, 64).contiguous()

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        x = x.to(self.compute_dtype)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.dynamic_act is None:
            act_amax = None
        elif self.dynamic_act.granularity == "tensor":  # one amax for every row
            amax = act_amax if act_amax is not None else activation_amax(x, self.dynamic_act)
            act_amax = amax.reshape(1).expand(x.shape[0])
        return getattr(cpu_ext.ops(), self.op_name)(
            x,
            self.packed,
            self.scale,
            self.zero,
            self.zconst,
            self.offset,
            bias,
            self.fmt,
            self.group,
            n,
            self.divisor,
            self.static_scale,
            act_amax,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={getattr(self, 'group', 0)}"


@register_kernel
class Avx512VnniKernel(Int8ActivationKernel):
    """Integer weights x int8 activations with vpdpbusd; see the module docstring."""

    name = "cpu_avx512_vnni"
    priority = 70  # above cpu_avx512 (60, weight-only) and cpu_w8a8_int8 (50)
    op_name = "vnni_linear"

    @classmethod
    def cpu_reason(cls) -> str | None:
        return _cpu_reason()
