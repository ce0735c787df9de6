"""cpu_w8a8_int8: int8 weights x int8 activations with int32 accumulation (torch._int_mm, oneDNN)."""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.errors import TensorError
from anyquant.quant.kernels.base import check_weight
from anyquant.quant.kernels.torch_cpu.chunking import TorchCpuKernel
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight


def _quantize_int8_activations(
    x: Tensor,
    token: bool,
    input_scale: Tensor | None,
    input_zero: Tensor | None,
    divisor: float = 127.0,
    amax: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """x [T, K] -> (codes int8 [T, K], scale fp32 [T, 1] or [1, 1], zero point or None).

    The same operations in the same order as anyquant.quant.reference.fake_quantize_activations,
    so codes * scale equal the reference's fake-quantized activations bit for bit. `amax`: a
    precomputed dynamic amax ([T, 1] or [1, 1]) used instead of x's own.
    """
    xf = x.float()
    zero = None
    if input_scale is not None:
        scale = input_scale.float().reshape(1, 1)
        q = torch.round(xf / scale)
        if input_zero is not None:
            zero = input_zero.float().reshape(1, 1)
            q = q + zero
    else:
        if amax is None:
            amax = xf.abs().amax(dim=-1, keepdim=True) if token else xf.abs().amax().reshape(1, 1)
        # An all-zero row has amax 0; clamp so 0/0 never makes NaN.
        scale = amax.clamp(min=1e-10) / divisor  # ActQuant.scale_divisor (127.5 for compressed-tensors)
        q = torch.round(xf / scale)
    return q.clamp_(-128.0, 127.0).to(torch.int8), scale, zero


def int_mm_rejects(spec: QuantSpec, shape: tuple[int, int], weight_only_kernel: str) -> str | None:
    """Why `torch._int_mm` (int8 x int8 -> int32, one scale per token and per output row) cannot
    run `spec` at `shape` on any device, or None. `weight_only_kernel` is named for int8 weights
    whose activations stay in floating point."""
    if spec.weight != "int8" or spec.has_zero:
        what = f"{spec.weight} {'asym' if spec.has_zero else 'sym'}"
        return f"weights are {what}; this kernel runs symmetric int8"
    if spec.granularity not in ("channel", "tensor"):
        return f"{spec.granularity} weight scales; this kernel takes per-channel or per-tensor scales"
    act = spec.act
    if act is None:
        return f"activations are not quantized (weight-only int8 runs on {weight_only_kernel})"
    if act.type != "int8":
        return f"activations are {act.type}; this kernel quantizes them to int8"
    if act.granularity == "group":
        return f"per-group activation scales (group {act.group_size}) need one int32 sum per group"
    if not act.dynamic and act.granularity != "tensor":
        return f"static per-{act.granularity} activation scales; static scales must be per-tensor"
    if shape[1] >= 1 << 17:
        return f"in_features {shape[1]} could overflow the int32 accumulator (limit 131072)"
    return None


def load_int8_activations(
    kernel: torch.nn.Module, w: QuantWeight, codes: Tensor
) -> tuple[bool, ActQuant | None, float]:
    """The activation side of a `torch._int_mm` kernel (CPU or CUDA), from an activation-quantized
    int8 spec: registers the static input scale / zero point and, with a zero point, each row's
    code sum (`codes` as the kernel stores them, padding included) on `kernel`; returns (per-token
    scales, the dynamic activation spec or None, the scale divisor)."""
    act = w.spec.act
    assert act is not None  # the kernels' load refuses weight-only specs first
    input_scale = input_zero = None
    if not act.dynamic:
        if w.input_scale is None:
            raise TensorError("input_scale", "static activation quantization needs an input scale")
        input_scale, input_zero = w.input_scale.float(), w.input_zero
    kernel.register_buffer("input_scale", input_scale, persistent=False)
    kernel.register_buffer("input_zero", input_zero, persistent=False)
    # With an activation zero point z: sum (q - z) c = sum q c - z * sum c, all in int32.
    colsum = codes.to(torch.int32).sum(dim=1) if input_zero is not None else None
    kernel.register_buffer("colsum", colsum, persistent=False)
    return (
        act.dynamic and act.granularity == "token",
        act if act.dynamic else None,
        act.scale_divisor or 127.0,
    )


@register_kernel
class CpuW8A8Int8Kernel(TorchCpuKernel):
    """int8 symmetric per-channel/per-tensor weights with int8 activations, via `torch._int_mm`.

    Activations: dynamic per-token, dynamic per-tensor, or static per-tensor (input_scale and
    optional input_zero), quantized exactly like the reference. The int32 accumulation is exact;
    scales are applied once in fp32: y = acc * s_x * s_w, so the result equals the reference up
    to fp32 rounding (the reference multiplies dequantized fp32 operands).
    """

    name = "cpu_w8a8_int8"
    priority = 50
    codes: Tensor  # int8 [N, K]
    scale: Tensor  # fp32 [N]
    input_scale: Tensor | None  # static activation scale
    input_zero: Tensor | None  # static activation zero point (int32)
    colsum: Tensor | None  # int32 [N], sum of each row's codes, with input_zero only

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        reason = int_mm_rejects(spec, shape, weight_only_kernel="cpu_int8_weight")
        if reason is not None:
            return reason
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return "oneDNN is unavailable or disabled; torch._int_mm would use its scalar loop"
        if not getattr(torch.cpu, "_is_vnni_supported", lambda: False)():
            return "the CPU lacks AVX512-VNNI; torch._int_mm would use its scalar loop"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = check_weight(weight, self)
        n, _ = self.shape
        act = w.spec.act
        if act is None:
            raise TypeError("cpu_w8a8_int8 needs an activation-quantized spec")
        self.register_buffer("codes", w.data.contiguous(), persistent=False)  # [N, K] int8
        self.register_buffer("scale", w.scale.float().reshape(-1).expand(n).contiguous(), persistent=False)
        self.token, self.dynamic_act, self.divisor = load_int8_activations(self, w, self.codes)

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        q, s_x, zero = _quantize_int8_activations(
            x, self.token, self.input_scale, self.input_zero, self.divisor, act_amax
        )
        acc = torch._int_mm(q, self.codes.T)  # [T, N] int32, exact
        if zero is not None and self.colsum is not None:
            acc = acc - zero.to(torch.int32) * self.colsum
        y = acc.to(torch.float32) * s_x * self.scale
        if bias is not None:  # in fp32, so the output is rounded once
            y = y + bias.float()
        return y.to(self.compute_dtype)
