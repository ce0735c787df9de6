"""What every checkpoint tensor must look like, judged from its safetensors header.

One home for the shape, dtype and presence checks of every tensor the config implies: linear
weights (quantized through the format's own `check_stored`, or dense), biases, embeddings,
norms, router parameters, the LM head, and tensors the model does not use. The loader runs
`check_linear` / `check_plain` on each tensor before reading it; the preflight (`inspect`) runs
`check_checkpoint` over the whole checkpoint without reading any data. Both call the same
functions, so they refuse the same checkpoints with the same message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anyquant.errors import CheckpointError, TensorError
from anyquant.layers.embedding import VocabParallelEmbedding
from anyquant.layers.linear import QuantLinear
from anyquant.loading.checkpoint import Checkpoint, TensorIndex, TensorInfo
from anyquant.loading.plan import LayerPlan
from anyquant.models.protocol import CausalLM
from anyquant.quant.formats.base import QuantFormat


def header_tensor(info: TensorInfo) -> Tensor:
    """A stand-in with the stored shape and dtype and no data (meta device): the formats' layout
    checks read only `.shape` and `.dtype`, so they run on these exactly as on the real tensors."""
    return torch.empty(info.shape, dtype=info.torch_dtype, device="meta")


def check_dense_weight(info: TensorInfo, shape: tuple[int, int]) -> None:
    """An unquantized linear weight: exactly [out, in] from config.json, a float dtype."""
    if info.shape != shape:
        raise TensorError(info.name, f"shape {list(info.shape)}, expected {list(shape)} (from config.json)")
    if not info.torch_dtype.is_floating_point:
        raise TensorError(
            info.name, f"dtype {info.torch_dtype} for an unquantized layer; expected a float dtype"
        )


def check_plain(info: TensorInfo, shape: tuple[int, ...]) -> None:
    """A non-linear parameter (embedding, norm, bias, router correction bias): shape and float dtype."""
    if info.shape != tuple(shape):
        raise TensorError(info.name, f"shape {list(info.shape)}, expected {list(shape)} (from config.json)")
    if not info.torch_dtype.is_floating_point:
        raise TensorError(info.name, f"dtype {info.torch_dtype}; expected a float dtype")


def check_linear(ckpt: Checkpoint, fmt: QuantFormat | None, plan: LayerPlan) -> list[str]:
    """Headers of one linear layer (weight tensors and bias) against its plan; returns the names of
    the checkpoint tensors loading it reads."""
    index = ckpt.index
    if plan.spec is not None and fmt is not None:
        for name in plan.stored.required:
            if name not in index:
                raise TensorError(
                    name,
                    f"missing: layer {plan.prefix!r} is stored as {plan.spec.describe()} "
                    f"({fmt.name}) and needs {', '.join(plan.stored.required)}",
                )
        names = [n for n in plan.stored.all() if n in index]
        fmt.check_stored(plan.prefix, plan.spec, {n: header_tensor(index.info(n)) for n in names}, plan.shape)
    else:
        names = [plan.stored.required[0]]
        check_dense_weight(index.info(names[0]), plan.shape)
    if plan.bias is not None:
        if plan.bias not in index:
            raise TensorError(plan.bias, f"missing: layer {plan.prefix!r} has a bias in this architecture")
        check_plain(index.info(plan.bias), (plan.shape[0],))
        names.append(plan.bias)
    return names


@dataclass(frozen=True)
class PlainParameter:
    """A parameter outside the linear layers' weights, loaded by its module path."""

    module: nn.Module
    attr: str
    name: str  # module path, e.g. "model.norm.weight"
    source: str  # checkpoint tensor holding it (the name, or a tied fallback)
    shape: tuple[int, ...]  # the whole tensor as stored (a vocab-parallel rank reads a slice of it)


def plain_parameters(model: CausalLM, index: TensorIndex) -> Iterator[PlainParameter]:
    """Norms, embeddings and other non-linear parameters, including extra parameters that a
    QuantLinear subclass declares (e.g. a router's score-correction bias); raises for a missing one."""
    tied = model.tied_weights()
    for module_name, module in model.named_modules():
        if module_name.endswith(".kernel") or ".kernel." in module_name:
            continue
        for attr, param in list(module.named_parameters(recurse=False)):
            if isinstance(module, QuantLinear) and attr == "bias":
                continue  # belongs to the layer's weight (check_linear)
            name = f"{module_name}.{attr}" if module_name else attr
            source = name if name in index else tied.get(name, name)
            if source not in index:
                raise TensorError(name, "missing from the checkpoint")
            shape = tuple(param.shape)
            if isinstance(module, VocabParallelEmbedding):
                shape = (module.partition.size, shape[1])
            yield PlainParameter(module, attr, name, source, shape)


def check_unused(ckpt: Checkpoint, fmt: QuantFormat | None, model: CausalLM, used: set[str]) -> None:
    """Every stored tensor with data must be used: a leftover means config and checkpoint disagree."""
    ignorable = model.ignorable_suffixes
    # Whole stored sub-trees a family does not run (e.g. DeepSeek-V3's multi-token-prediction layer).
    ignorable_prefixes = model.ignorable_prefixes
    ignored_by_format = getattr(fmt, "ignored_tensor", None)
    # Zero-element tensors carry nothing (tools write empty quantization tensors for layers they
    # left unquantized), so they never make a checkpoint "disagree" with the model.
    unused = [
        n
        for n in ckpt.index
        if n not in used
        and ckpt.index.has_data(n)
        and not n.endswith(ignorable)
        and not n.startswith(ignorable_prefixes)
        and not (ignored_by_format is not None and ignored_by_format(n))
    ]
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise CheckpointError(
            f"{ckpt.path}: {len(unused)} checkpoint tensors are not used by the model, e.g. "
            f"{', '.join(unused[:5])}{more}; the checkpoint and config.json disagree about the architecture"
        )


def check_checkpoint(
    ckpt: Checkpoint, fmt: QuantFormat | None, model: CausalLM, plans: list[LayerPlan]
) -> None:
    """The preflight: every header check the loader makes, in the loader's order, reading no data.
    `model` is the (meta) model the plans were made for."""
    used: set[str] = set()
    for plan in plans:
        used.update(check_linear(ckpt, fmt, plan))
    for param in plain_parameters(model, ckpt.index):
        check_plain(ckpt.index.info(param.source), param.shape)
        used.add(param.source)
    check_unused(ckpt, fmt, model, used)
