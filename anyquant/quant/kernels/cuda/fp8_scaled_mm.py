"""cuda_fp8_scaled_mm: fp8 e4m3 weights x fp8 e4m3 activations on fp8 tensor cores
(`torch._scaled_mm`, sm89+), fp32 accumulation, scales applied in the epilogue.

Activations are quantized exactly as the reference does (same amax, divisor, clamp and cast), so
the codes equal the reference's; only the summation order differs. Scales: one per tensor on
both sides is the tensor-wise form (any output dtype); a per-token or per-channel side makes it
row-wise ([M, 1] x [1, N]), which torch runs on sm90 with bf16 output. Block scales (DeepSeek's
128 x 128 weights with 1 x 128 activation groups) run on cuda_dequant."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from anyquant.errors import TensorError
from anyquant.quant.kernels.base import check_weight, round_up
from anyquant.quant.kernels.cuda.base import CudaKernel, finish
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight
from anyquant.quant.weight_types import weight_traits
from anyquant.utils.devices import CudaProperties

ALIGN = 16  # _scaled_mm: K and N multiples of 16 (M padded alike, so row-wise scales line up)
ROWWISE_CAPABILITY = (9, 0)


def rowwise(spec: QuantSpec) -> bool:
    """Whether a per-token / per-channel side makes the scales row-wise."""
    act = spec.act
    return spec.granularity == "channel" or (act is not None and act.dynamic and act.granularity == "token")


def quantize_fp8_activations(
    x: Tensor, act: ActQuant, input_scale: Tensor | None, amax: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (fp8 codes [T, K], fp32 scale [T, 1] or [1, 1]), the reference's operations in
    its order (quant/reference.fake_quantize_activations)."""
    xf = x.float()
    traits = weight_traits(act.type)
    if act.dynamic:
        if amax is None:
            amax = (
                xf.abs().amax(dim=-1, keepdim=True)
                if act.granularity == "token"
                else xf.abs().amax().reshape(1, 1)
            )
        scale = amax.clamp(min=1e-10) / (act.scale_divisor or traits.code_max)
    else:
        if input_scale is None:
            raise TensorError("input_scale", "static activation quantization needs an input scale")
        scale = input_scale.float().reshape(1, 1)
    codes = (xf / scale).clamp(traits.code_min, traits.code_max).to(traits.code_dtype)
    return codes, scale


@register_kernel
class CudaFp8ScaledMMKernel(CudaKernel):
    name = "cuda_fp8_scaled_mm"
    priority = 60
    min_capability = (8, 9)
    why_capability = "fp8 tensor cores"
    codes: Tensor  # fp8 [Npad, Kpad]
    scale_w: Tensor  # fp32 [1, Npad] (row-wise) or [] (tensor-wise)
    input_scale: Tensor | None

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        if spec.weight != "fp8_e4m3":
            return f"weights are {spec.weight}; this kernel runs fp8 e4m3"
        if spec.granularity not in ("channel", "tensor"):
            return f"{spec.granularity} weight scales; _scaled_mm takes per-tensor or per-channel scales here"
        act = spec.act
        if act is None:
            return "activations are not quantized (fp8 weight-only runs on cuda_dequant)"
        if act.type != "fp8_e4m3":
            return f"activations are {act.type}; this kernel quantizes them to fp8 e4m3"
        if act.granularity == "group":
            return f"per-group activation scales (group {act.group_size}) are not a _scaled_mm scale layout"
        if not act.dynamic and (act.granularity != "tensor" or not act.symmetric):
            return "static activation scales must be symmetric and per-tensor"
        return None

    @classmethod
    def rejects_on(
        cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype, props: CudaProperties
    ) -> str | None:
        reason = super().rejects_on(spec, shape, compute_dtype, props)
        if reason is None and rowwise(spec):
            if props.capability < ROWWISE_CAPABILITY:
                return f"row-wise fp8 scales (per-token or per-channel) need compute capability 9.0; {props.describe()}"
            if compute_dtype != torch.bfloat16:
                return f"row-wise scaled fp8 matmuls output bfloat16 only; compute dtype is {compute_dtype}"
        return reason

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = check_weight(weight, self)
        spec = w.spec
        assert spec.act is not None, "rejects() admits activation-quantized specs only"
        n, k = self.shape
        self.act = spec.act
        self.k_pad, self.n_pad = round_up(k, ALIGN), round_up(n, ALIGN)
        self.rowwise = rowwise(spec)
        codes = w.data.view(torch.uint8)  # pad the bytes: 0x00 is +0.0
        codes = F.pad(codes, (0, self.k_pad - k, 0, self.n_pad - n)).view(w.data.dtype)
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        scale = w.scale.float().reshape(-1)
        if self.rowwise:
            scale = F.pad(scale.expand(n), (0, self.n_pad - n), value=1.0).reshape(1, self.n_pad)
        else:
            scale = scale.reshape(())
        self.register_buffer("scale_w", scale.contiguous(), persistent=False)
        self.register_buffer(
            "input_scale", None if w.input_scale is None else w.input_scale.float(), persistent=False
        )
        self.dynamic_act = spec.act if spec.act.dynamic else None
        self.out_dtype = torch.bfloat16 if self.rowwise else self.compute_dtype

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n, k = self.shape
        t = x.shape[0]
        if t == 0:
            return x.new_zeros(0, n)
        q, s_x = quantize_fp8_activations(x, self.act, self.input_scale, act_amax)
        rows = round_up(t, ALIGN)
        q = F.pad(q.view(torch.uint8), (0, self.k_pad - k, 0, rows - t)).view(q.dtype)
        if self.rowwise:
            scale_a = F.pad(s_x.expand(t, 1), (0, 0, 0, rows - t), value=1.0).contiguous()
        else:
            scale_a = s_x.reshape(())
        y = torch._scaled_mm(q, self.codes.T, scale_a=scale_a, scale_b=self.scale_w, out_dtype=self.out_dtype)
        return finish(y[:t], n, bias, self.compute_dtype)
