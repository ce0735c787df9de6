"""The `LinearKernel` interface: computes x @ W.T for one layer from its canonical weight.

A kernel says why it cannot serve a layer (`cannot_run`), receives the canonical weight once
(`load`, where it repacks into whatever layout it likes) and multiplies (`forward`). It never
reads checkpoints or knows which format the weight came from.

A kernel that quantizes its input with dynamic scales sets `dynamic_act` in `load`, and its
forward then also takes `act_amax=`: an amax (`anyquant.quant.reference.activation_amax` shape)
computed by the caller, which a row-parallel layer takes over every rank's slice of the input.
The kernel never communicates itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight


class LinearKernel(nn.Module, ABC):
    name: ClassVar[str]
    priority: ClassVar[int] = 0  # higher wins when several can run
    # How this kernel quantizes activations with dynamic scales (set by `load`); None: it does not.
    dynamic_act: ActQuant | None = None

    def __init__(self, shape: tuple[int, int], compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = shape  # (out_features, in_features)
        self.compute_dtype = compute_dtype

    @classmethod
    @abstractmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        """Why this kernel cannot serve the layer, or None if it can."""

    @abstractmethod
    def load(self, weight: QuantWeight | Tensor) -> None:
        """Receive the canonical (or dense) weight once; keep what forward needs as buffers."""

    @abstractmethod
    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x: [T, in] in compute dtype -> [T, out] in compute dtype."""

    def extra_repr(self) -> str:
        return f"{self.name}, shape={self.shape}, dtype={self.compute_dtype}"
