"""cuda_w8a8_int8: int8 weights x int8 activations with exact int32 accumulation (`torch._int_mm`,
cuBLASLt int8 tensor cores), activations quantized exactly as the reference does.

cuBLASLt's int8 GEMM takes more than 16 rows and inner / output sizes that are multiples of 8:
the activation rows are padded up to 24 at least (decode steps of a few tokens), K and N with
zeros at load (a zero column adds nothing to the int32 sum)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from anyquant.quant.kernels.base import check_weight, round_up
from anyquant.quant.kernels.cuda.base import CudaKernel, finish
from anyquant.quant.kernels.torch_cpu import _quantize_int8_activations
from anyquant.quant.kernels.torch_cpu.w8a8 import int_mm_rejects, load_int8_activations
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight

MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
ALIGN = 8


@register_kernel
class CudaW8A8Int8Kernel(CudaKernel):
    name = "cuda_w8a8_int8"
    priority = 60
    min_capability = (7, 5)
    why_capability = "int8 tensor cores"
    codes: Tensor  # int8 [Npad, Kpad]
    scale: Tensor  # fp32 [N]
    input_scale: Tensor | None
    input_zero: Tensor | None
    colsum: Tensor | None  # int32 [Npad]: each row's code sum, with an activation zero point only

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        return int_mm_rejects(spec, shape, weight_only_kernel="cuda_dequant")

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = check_weight(weight, self)
        n, k = self.shape
        act = w.spec.act
        if act is None:
            raise TypeError("cuda_w8a8_int8 needs an activation-quantized spec")
        self.k_pad, n_pad = round_up(k, ALIGN), round_up(n, ALIGN)
        codes = F.pad(w.data, (0, self.k_pad - k, 0, n_pad - n))
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scale", w.scale.float().reshape(-1).expand(n).contiguous(), persistent=False)
        self.token, self.dynamic_act, self.divisor = load_int8_activations(self, w, codes)

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n, k = self.shape
        t = x.shape[0]
        if t == 0:
            return x.new_zeros(0, n)
        q, s_x, zero = _quantize_int8_activations(
            x, self.token, self.input_scale, self.input_zero, self.divisor, act_amax
        )
        rows = round_up(max(t, MIN_ROWS), ALIGN)
        q = F.pad(q, (0, self.k_pad - k, 0, rows - t))
        acc = torch._int_mm(q, self.codes.T)[:t, :n]  # [T, N] int32, exact
        if zero is not None and self.colsum is not None:
            acc = acc - zero.to(torch.int32) * self.colsum[:n]
        y = acc.to(torch.float32) * s_x * self.scale  # scales applied once, in fp32
        return finish(y, n, None if bias is None else bias.float(), self.compute_dtype)
