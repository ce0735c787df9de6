"""`QuantLinear`: a linear layer whose math is delegated to the kernel chosen for its weight.

Owns the layer's identity (checkpoint prefix, kind, shape) and its bias. It never looks at what
the kernel holds: the loader hands it a ready kernel through `set_kernel`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.spec import LayerKind


class QuantLinear(nn.Module):
    def __init__(
        self, prefix: str, in_features: int, out_features: int, bias: bool = False, kind: LayerKind = "linear"
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.in_features = in_features
        self.out_features = out_features
        self.kind: LayerKind = kind
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: LinearKernel | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def set_kernel(self, kernel: LinearKernel) -> None:
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is None:
            raise RuntimeError(f"{self.prefix}: no weight loaded")
        return self.kernel(x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.prefix!r}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
        )
