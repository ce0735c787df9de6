"""The reference kernel: dequantize, (fake-)quantize activations, matmul. Every spec, every device.

It keeps the canonical weight and dequantizes on every call, so it is slow but its memory is the
quantized size, and it is the definition of correct that every fast kernel is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.reference import dequantize, fake_quantize_activations
from anyquant.quant.registry import register_kernel
from anyquant.quant.weight import QuantWeight


@register_kernel
class ReferenceKernel(LinearKernel):
    name = "reference"
    priority = 0

    # Every quantized layer on any device in any dtype, routers included; not embeddings.
    kinds = frozenset(("linear", "experts", "lm_head", "router"))
    empty_shapes = True

    def load(self, weight: QuantWeight | Tensor) -> None:
        if not isinstance(weight, QuantWeight):
            raise TypeError("reference kernel expects a QuantWeight")
        self.weight = weight
        act = weight.spec.act
        self.dynamic_act = act if act is not None and act.dynamic else None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def,unused-ignore]
        # The canonical tensors are not buffers (a dataclass holds them); move them with the
        # module, but only change their device: codes and scales keep their dtypes.
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device
        w = self.weight
        for attr in ("data", "scale", "zero", "group_index", "input_scale", "input_zero", "offset"):
            t = getattr(w, attr)
            if t is not None:
                setattr(w, attr, t.to(device))
        return self

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        w = self.weight
        if w.spec.act is not None:
            x = fake_quantize_activations(x, w.spec.act, w.input_scale, w.input_zero, act_amax)
            x = x.to(self.compute_dtype)
        dense = dequantize(w, self.compute_dtype)
        return torch.nn.functional.linear(x, dense, bias)
