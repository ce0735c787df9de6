"""The load plan: for every linear layer of a model, its stored spec, tensors and kernel.

Computed from headers only, so `inspect` shows exactly what loading will do, and the loader
executes the same plan. Owns the decision "quantized or not" per layer (by asking the format)
and the kernel choice (by asking the registry) for the shape and spec this rank will hold; it
reads no tensor data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from anyquant.errors import TensorError
from anyquant.layers.linear import QuantLinear
from anyquant.loading.activations import with_activations
from anyquant.loading.checkpoint import Checkpoint
from anyquant.models.protocol import CausalLM
from anyquant.quant.formats.base import QuantFormat, StoredNames
from anyquant.quant.registry import KernelChoice, choose_kernel
from anyquant.quant.shard_rules import shard_kernel
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec, layer_compute_dtype

if TYPE_CHECKING:
    from anyquant.loading.preflight import LinearShard, TensorParallelPlan


@dataclass(frozen=True)
class LayerPlan:
    prefix: str
    kind: LayerKind
    shape: tuple[int, int]  # (out_features, in_features)
    spec: QuantSpec | None  # None: stored unquantized
    stored: StoredNames  # tensors that make up the weight (dense: the weight or its tied source)
    kernel: KernelChoice  # chosen for this rank's shard (local_shape, local_spec)
    bias: str | None  # checkpoint name of the bias, when the layer has one
    shard: LinearShard | None = None  # tensor parallelism: how this rank's piece is cut; None: whole
    # Stored unquantized, quantized at load to this spec (the int8 LM head); None: as stored.
    load_as: QuantSpec | None = None
    # Weight-only, run with activations quantized at load time (`--activation-dtype`); None: as stored.
    act_as: ActQuant | None = None

    @property
    def local_shape(self) -> tuple[int, int]:
        return self.shard.local_shape if self.shard is not None else self.shape

    @property
    def local_spec(self) -> QuantSpec | None:
        return self.shard.local_spec if self.shard is not None else self.spec

    @property
    def kernel_spec(self) -> QuantSpec | None:
        """The spec of the weight this rank's kernel receives."""
        spec = self.load_as if self.load_as is not None else self.local_spec
        return with_activations(spec, self.kind, self.act_as)


def linear_layers(model: CausalLM) -> Iterator[QuantLinear]:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            yield module


def plan_layers(
    ckpt: Checkpoint,
    fmt: QuantFormat | None,
    model: CausalLM,
    device: torch.device,
    compute_dtype: torch.dtype,
    prefer_kernel: str | None = None,
    tp: TensorParallelPlan | None = None,
    lm_head_as: QuantSpec | None = None,
    activations: ActQuant | None = None,
) -> list[LayerPlan]:
    """One plan per linear layer; with `tp`, kernels are chosen for the per-rank shards.
    `lm_head_as`: quantize an unquantized LM head to this spec at load (loading/lm_head.py).
    `activations`: quantize the activations of weight-only layers so (loading/activations.py)."""
    tied = model.tied_weights()
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
        shard = tp.shards.get(prefix) if tp is not None else None
        shape, local = layer.shape, spec
        load_as = lm_head_as if kind == "lm_head" and spec is None else None
        if shard is not None:
            shape, local = shard.local_shape, shard.local_spec
            prefer = shard_kernel(shard.style, local, prefer)
        if load_as is not None:
            local, prefer = load_as, prefer_kernel
        with_act = with_activations(local, kind, activations)
        act_as = activations if with_act is not local else None
        kernel = choose_kernel(with_act, kind, device, shape, dtype, prefer=prefer)
        bias = f"{prefix}.bias" if layer.bias is not None else None
        plans.append(LayerPlan(prefix, kind, layer.shape, spec, stored, kernel, bias, shard, load_as, act_as))
    return plans
