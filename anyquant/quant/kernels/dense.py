"""The dense kernel: an unquantized layer (vision towers, routers, lm_head, skipped modules)."""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight


@register_kernel
class DenseKernel(LinearKernel):
    name = "dense"
    priority = 100

    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        return None if spec is None else "layer is quantized"

    def load(self, weight: QuantWeight | Tensor) -> None:
        if isinstance(weight, QuantWeight):
            raise TypeError("dense kernel expects a plain tensor")
        self.weight = torch.nn.Parameter(weight.to(self.compute_dtype), requires_grad=False)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return torch.nn.functional.linear(x, self.weight, bias)
