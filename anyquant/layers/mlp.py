"""Gated MLP (SwiGLU): down(act(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anyquant.layers.activation import activation
from anyquant.layers.linear import (
    MergeableProjections,
    MergedLinear,
    ProjectionGroup,
    QuantLinear,
    SplitGroup,
    TensorParallelLayer,
)
from anyquant.quant.spec import LayerKind

PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


class GatedMLP(nn.Module, TensorParallelLayer, MergeableProjections):
    def __init__(
        self,
        prefix: str,
        hidden_size: int,
        intermediate_size: int,
        act: str = "silu",
        bias: bool = False,
        reduce_output: bool = True,
        kind: LayerKind = "linear",
        names: tuple[str, str, str] = PROJ_NAMES,
    ) -> None:
        """reduce_output=False: under tensor parallelism the caller sums the ranks' outputs (MoE).
        `names`: the checkpoint's gate / up / down module names (Mixtral experts: w1 / w3 / w2)."""
        super().__init__()
        gate, up, down = names
        self.prefix = prefix
        self.gate_proj = QuantLinear(
            f"{prefix}.{gate}", hidden_size, intermediate_size, bias, kind=kind, style="column"
        )
        self.up_proj = QuantLinear(
            f"{prefix}.{up}", hidden_size, intermediate_size, bias, kind=kind, style="column"
        )
        self.down_proj = QuantLinear(
            f"{prefix}.{down}",
            intermediate_size,
            hidden_size,
            bias,
            kind=kind,
            style="row",
            reduce_output=reduce_output,
        )
        self.act = activation(act)
        # gate/up in one kernel call, when the loader could merge them (then the two hold nothing).
        self.gate_up_proj: MergedLinear | None = None
        # Set by the fp16 policy (engine/fp16_guard.py): act(gate) * up formed in this dtype, since
        # the product of two fp16 values below 65504 can exceed it.
        self.hidden_dtype: torch.dtype | None = None

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

    def projection_groups(self) -> list[ProjectionGroup]:
        # Routed experts are left to the MoE block, which decides how they are computed.
        if self.gate_proj.kind != "linear":
            return []
        return [ProjectionGroup(self, "gate_up_proj", (self.gate_proj, self.up_proj))]

    def hidden(self, x: Tensor) -> Tensor:
        """The down projection's input: act(gate(x)) * up(x)."""
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj.forward_parts(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.hidden_dtype is not None:
            gate, up = gate.to(self.hidden_dtype), up.to(self.hidden_dtype)
        return self.act(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.hidden(x))
