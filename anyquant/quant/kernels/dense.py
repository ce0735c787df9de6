"""The dense kernel: an unquantized layer (vision towers, routers, lm_head, skipped modules)."""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.registry import register_kernel
from anyquant.quant.weight import QuantWeight


@register_kernel
class DenseKernel(LinearKernel):
    name = "dense"
    priority = 100

    serves = "dense"
    kinds = frozenset(("linear", "experts", "router", "embedding", "lm_head"))

    def load(self, weight: QuantWeight | Tensor) -> None:
        if isinstance(weight, QuantWeight):
            raise TypeError("dense kernel expects a plain tensor")
        self.weight = torch.nn.Parameter(weight.to(self.compute_dtype), requires_grad=False)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if x.shape[0] == 1 and bias is None and self.weight.dtype in _MV_DTYPES and x.device.type == "cpu":
            # One row (batch-1 decode): torch's matrix-vector path streams a 16-bit weight faster
            # than its GEMM on CPU (a 151936 x 896 bf16 LM head alone: 11.7 vs 22.8 ms; a whole
            # decode step of the Qwen2.5-0.5B-shaped int4 model: 45.5 vs 47.7 ms). fp32 keeps the
            # GEMM, so fp32 outputs do not depend on how many rows a step has.
            return torch.mv(self.weight, x[0]).unsqueeze(0)
        return torch.nn.functional.linear(x, self.weight, bias)


_MV_DTYPES = (torch.bfloat16, torch.float16)
