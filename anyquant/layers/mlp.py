"""Gated MLP (SwiGLU): down(act(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

from __future__ import annotations

from torch import Tensor, nn

from anyquant.layers.activation import activation
from anyquant.layers.linear import QuantLinear, SplitGroup, TensorParallelLayer


class GatedMLP(nn.Module, TensorParallelLayer):
    def __init__(
        self,
        prefix: str,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        bias: bool = False,
        reduce_output: bool = True,
    ) -> None:
        """reduce_output=False: under tensor parallelism the caller sums the ranks' outputs (MoE)."""
        super().__init__()
        self.prefix = prefix
        self.gate_proj = QuantLinear(
            f"{prefix}.gate_proj", hidden_size, intermediate_size, bias, style="column"
        )
        self.up_proj = QuantLinear(f"{prefix}.up_proj", hidden_size, intermediate_size, bias, style="column")
        self.down_proj = QuantLinear(
            f"{prefix}.down_proj",
            intermediate_size,
            hidden_size,
            bias,
            style="row",
            reduce_output=reduce_output,
        )
        self.act = activation(act)

    def split_groups(self) -> list[SplitGroup]:
        # The intermediate dimension may be zero-padded: padded gate/up rows give exact zeros.
        units = self.down_proj.in_features
        return [
            SplitGroup(
                "channels",
                self.prefix,
                units,
                ((self.gate_proj, 1), (self.up_proj, 1)),
                ((self.down_proj, 1),),
            )
        ]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
