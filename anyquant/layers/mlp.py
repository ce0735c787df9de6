"""Gated MLP (SwiGLU): down(act(gate(x)) * up(x))."""

from __future__ import annotations

from torch import Tensor, nn

from anyquant.layers.activation import activation
from anyquant.layers.linear import QuantLinear


class GatedMLP(nn.Module):
    def __init__(
        self, prefix: str, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False
    ) -> None:
        super().__init__()
        self.gate_proj = QuantLinear(f"{prefix}.gate_proj", hidden_size, intermediate_size, bias)
        self.up_proj = QuantLinear(f"{prefix}.up_proj", hidden_size, intermediate_size, bias)
        self.down_proj = QuantLinear(f"{prefix}.down_proj", intermediate_size, hidden_size, bias)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
