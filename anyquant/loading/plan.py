"""The load plan: for every linear layer of a model, its stored spec, tensors and kernel.

Computed from headers only, so `inspect` shows exactly what loading will do, and the loader
executes the same plan. Owns the decision "quantized or not" per layer (by asking the format)
and the kernel choice (by asking the registry); it reads no tensor data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from anyquant.errors import TensorError
from anyquant.layers.linear import QuantLinear
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.formats.base import QuantFormat, StoredNames
from anyquant.quant.registry import KernelChoice, choose_kernel
from anyquant.quant.spec import LayerKind, QuantSpec


@dataclass(frozen=True)
class LayerPlan:
    prefix: str
    kind: LayerKind
    shape: tuple[int, int]  # (out_features, in_features)
    spec: QuantSpec | None  # None: stored unquantized
    stored: StoredNames  # tensors that make up the weight (dense: the weight or its tied source)
    kernel: KernelChoice
    bias: str | None  # checkpoint name of the bias, when the layer has one


def layer_compute_dtype(kind: LayerKind, model_dtype: torch.dtype) -> torch.dtype:
    """Routers run in fp32: expert selection flips on tiny logit differences."""
    return torch.float32 if kind == "router" else model_dtype


def linear_layers(model: nn.Module) -> Iterator[QuantLinear]:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            yield module


def plan_layers(
    ckpt: Checkpoint,
    fmt: QuantFormat | None,
    model: nn.Module,
    device: torch.device,
    compute_dtype: torch.dtype,
    prefer_kernel: str | None = None,
) -> list[LayerPlan]:
    tied: dict[str, str] = getattr(model, "tied_weights", dict)()
    plans = []
    for layer in linear_layers(model):
        prefix, kind = layer.prefix, layer.kind
        spec = fmt.spec_for(prefix, kind) if fmt is not None else None
        if spec is not None and fmt is not None:
            stored = fmt.stored_names(prefix, spec)
        else:
            name = f"{prefix}.weight"
            if name not in ckpt.index and name in tied:
                name = tied[name]
            if not ckpt.index.has_data(name):
                raise TensorError(
                    f"{prefix}.weight",
                    "missing: the layer has neither quantized tensors"
                    + (f" ({fmt.name} format)" if fmt else "")
                    + " nor a plain weight",
                )
            stored = StoredNames((name,))
        prefer = prefer_kernel if spec is not None else None
        dtype = layer_compute_dtype(kind, compute_dtype)
        kernel = choose_kernel(spec, kind, device, layer.shape, dtype, prefer=prefer)
        bias = f"{prefix}.bias" if layer.bias is not None else None
        plans.append(LayerPlan(prefix, kind, layer.shape, spec, stored, kernel, bias))
    return plans
