"""THE weight-loading path: model directory -> model with every weight in place, on a device.

Order is fixed: read a layer's stored tensors -> format.decode -> canonical QuantWeight ->
shard (tensor parallelism: this rank's rows or columns, zero-padded) -> kernel.load (repack
once) -> drop the temporaries, one layer at a time, so peak memory is the model (this rank's
share of it) plus about one layer. Dense tensors are read only where this rank needs them.
Strict: a missing tensor, a shape or dtype mismatch or an unused checkpoint tensor is an error
naming it; the header checks live in validate.py, shared with the preflight (`inspect`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anyquant.errors import TensorError, UnsupportedError
from anyquant.layers.embedding import VocabParallelEmbedding
from anyquant.layers.linear import MergedLinear, QuantLinear
from anyquant.layers.mla import MLAttention
from anyquant.layers.moe import SparseMoE
from anyquant.loading.activations import activation_quant, with_activations
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.dtype_policy import device_compute_dtype
from anyquant.loading.lm_head import lm_head_spec, quantize_rows
from anyquant.loading.merge import MergePlan, merged_layers, plan_merges
from anyquant.loading.plan import LayerPlan, plan_layers
from anyquant.loading.preflight import (
    LinearShard,
    TensorParallelPlan,
    apply_tensor_parallel,
    check_expert_parallel,
    plan_tensor_parallel,
    spec_lookup,
)
from anyquant.loading.progress import LoadProgress
from anyquant.loading.sources import open_checkpoint
from anyquant.loading.validate import check_linear, check_plain, check_unused, plain_parameters
from anyquant.models.base import DecoderLM
from anyquant.models.protocol import CausalLM
from anyquant.models.registry import build_model
from anyquant.parallel.partition import Partition
from anyquant.parallel.state import ParallelState
from anyquant.quant.detect import detect_format
from anyquant.quant.formats.base import QuantFormat
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.merge import concat_out_features
from anyquant.quant.registry import choose_kernel
from anyquant.quant.shard_rules import activation_group_map, shard_kernel, shard_quant, shard_vector
from anyquant.quant.spec import layer_compute_dtype
from anyquant.quant.weight import QuantWeight, weight_to_device
from anyquant.utils import huge_pages
from anyquant.utils.devices import configure_cuda_numerics, resolve_device
from anyquant.utils.memory import return_freed_memory

log = logging.getLogger(__name__)

# Decoding and repacking a layer allocates temporaries of many times its stored size (codes
# unpacked to a byte each, integer intermediates, padded copies: ~23 MB for one 768 x 2048 int4
# expert projection of 0.8 MB). glibc cannot return them while the repacked weights are allocated
# between them, so without a trim resident memory grows by all of them: loading a 1.5 GB
# Qwen3-30B-A3B-shaped layer peaked at 8.7 GB. Trim after this many decoded bytes.
_TRIM_EVERY_BYTES = 8 << 20
# Read pages of the memory-mapped checkpoint count as resident memory while the map is open:
# close the maps after this many bytes (they reopen on the next read) and once loading is done.
_UNMAP_EVERY_BYTES = 512 << 20

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    checkpoint: Checkpoint
    format: QuantFormat | None
    config: dict[str, Any]
    compute_dtype: torch.dtype
    device: torch.device
    plans: list[LayerPlan]
    timings: dict[str, float] = field(default_factory=dict)
    parallel: ParallelState = field(default_factory=ParallelState)
    tp_plan: TensorParallelPlan | None = None
    # Projection groups: merged prefix -> None when merged, else why its members stayed apart.
    merges: dict[str, str | None] = field(default_factory=dict)


def trained_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype config.json says the model was trained / saved in (float32 when unknown)."""
    return _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)


def resolve_dtype(requested: str | torch.dtype, config: dict[str, Any], device: torch.device) -> torch.dtype:
    """`auto` = the checkpoint's dtype (torch_dtype / dtype in config.json), float32 when unknown.

    Asking for float16 on a model trained in bfloat16 is allowed but warned about: its activations
    may exceed fp16's 65504. The residual stream and norms stay in fp32 either way. On a GPU
    without bf16, `auto` gives float16 instead of bfloat16 (loading/dtype_policy.py).
    """
    trained = trained_dtype(config)
    if isinstance(requested, torch.dtype):
        chosen = requested
    elif requested == "auto":
        chosen = trained
    elif requested in _DTYPES:
        chosen = _DTYPES[requested]
    else:
        raise UnsupportedError(f"dtype {requested!r} is not supported; choose auto, {', '.join(_DTYPES)}")
    auto = requested == "auto"
    chosen = device_compute_dtype(chosen, trained, auto, device)
    if chosen == torch.float16 and trained == torch.bfloat16 and not (auto and device.type == "cuda"):
        log.warning(
            "running a bfloat16-trained model in float16: activations beyond 65504 overflow to inf; "
            "the residual stream, norms and accumulations stay in float32, the warm-up rescales the MLP "
            "and attention-output projections that come near the limit and fails on a layer that still "
            "overflows (prefer dtype=bfloat16 or float32)"
        )
    return chosen


def build_on_meta(config: dict[str, Any], tensor_names: Collection[str] = ()) -> CausalLM:
    with torch.device("meta"):
        return build_model(config, tensor_names)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    kernel: str | None = None,
    parallel: ParallelState | None = None,
    progress: LoadProgress | None = None,
    merge_projections: bool = True,
    lm_head_dtype: str = "auto",
    activation_dtype: str = "auto",
    mmproj: str | Path | None = None,
    expert_parallel: bool = False,
) -> LoadedModel:
    """Load `path`; with `parallel` (world size > 1), only this rank's shard of every split layer.
    `progress` receives the phases "reading" (headers, config, plan) and "repacking" (reading,
    decoding and repacking every weight); by default a bar on a terminal, log lines otherwise.
    `merge_projections`: q/k/v and gate/up as one weight each where possible (loading/merge.py);
    False keeps every projection apart (same logits, more kernel calls).
    `lm_head_dtype`: "auto" keeps the LM head as stored; "int8" (per row) or "int4" (per group of
    a row) quantizes an unquantized one at load (loading/lm_head.py).
    `activation_dtype`: "auto" runs weight-only layers as stored; "int8" quantizes their
    activations per token at run time (loading/activations.py).

    `mmproj`: llama.cpp's vision projector for a GGUF language model (loading/gguf_mmproj.py).

    `expert_parallel`: under tensor parallelism, each rank loads whole routed experts (its share
    of them) instead of a slice of every expert; refused for a model without MoE layers."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        configure_cuda_numerics()
    parallel = parallel or ParallelState()
    if progress is None:
        progress = LoadProgress(str(path), show_bar=None if parallel.rank == 0 else False)
    with progress.phase("reading"):
        ckpt = open_checkpoint(path, mmproj)
        config = ckpt.text_config()
        fmt = detect_format(ckpt)
        compute_dtype = resolve_dtype(dtype, config, dev)
        model = build_on_meta(config, ckpt.index.names())
        if expert_parallel:
            check_expert_parallel(model)
        tp = (
            plan_tensor_parallel(model, spec_lookup(fmt), parallel.world_size, expert_parallel)
            if parallel.is_parallel
            else None
        )
        head_as = lm_head_spec(lm_head_dtype)
        plans = plan_layers(
            ckpt,
            fmt,
            model,
            dev,
            compute_dtype,
            kernel,
            tp=tp,
            lm_head_as=head_as,
            activations=activation_quant(activation_dtype),
        )
        # Expert parallelism: other ranks' experts are checked from their headers, never read.
        elsewhere = [p for p in plans if tp is not None and not tp.holds(p.prefix, parallel.rank)]
        if elsewhere:
            plans = [p for p in plans if tp is None or tp.holds(p.prefix, parallel.rank)]
        if head_as is not None:
            for plan in plans:
                if plan.kind == "lm_head" and plan.spec is not None:
                    log.warning(
                        "%s is stored quantized (%s): lm_head_dtype=%s keeps it as stored",
                        plan.prefix,
                        plan.spec.describe(),
                        lm_head_dtype,
                    )
        if tp is not None:
            with torch.device("meta"):
                apply_tensor_parallel(model, tp, parallel)
    with progress.phase("repacking"):
        used: set[str] = set()
        layers = {m.prefix: m for m in model.modules() if isinstance(m, QuantLinear)}
        merges = plan_merges(model, plans, dev, compute_dtype, kernel, enabled=merge_projections)
        merge_of = merged_layers(merges)
        kept_apart: dict[str, str] = {}
        progress.start_weights(sum(_stored_bytes(ckpt, name) for name in ckpt.index))
        since_trim = since_unmap = 0
        try:
            for plan in elsewhere:
                read = check_linear(ckpt, fmt, plan)
                used.update(read)
                progress.advance(sum(_stored_bytes(ckpt, n) for n in read))
            for plan in plans:
                merge = merge_of.get(plan.prefix)
                if merge is None:
                    read = _load_linear(
                        ckpt, fmt, layers[plan.prefix], plan, compute_dtype, dev, kernel, parallel.rank
                    )
                elif plan is merge.members[0]:  # the whole group loads with its first member
                    read, reason = _load_merged(
                        ckpt, fmt, merge, layers, compute_dtype, dev, kernel, parallel.rank
                    )
                    if reason is not None:
                        kept_apart[merge.prefix] = reason
                        log.info("%s: kept apart (%s)", merge.prefix, reason)
                else:
                    continue
                used.update(read)
                nbytes = sum(_stored_bytes(ckpt, n) for n in read)
                progress.advance(nbytes)
                since_trim, since_unmap = since_trim + nbytes, since_unmap + nbytes
                if since_unmap >= _UNMAP_EVERY_BYTES:
                    ckpt.close()
                    since_unmap = 0
                if since_trim >= _TRIM_EVERY_BYTES:
                    return_freed_memory()
                    since_trim = 0
            before_plain = set(used)
            _load_plain(ckpt, model, compute_dtype, dev, used)
            progress.advance(sum(_stored_bytes(ckpt, n) for n in used - before_plain))
        finally:
            progress.finish_weights()
        check_unused(ckpt, fmt, model, used)
        ckpt.close()
        for module in model.modules():
            # Layers that rearrange loaded weights once: MoE stacks its experts for the fused call
            # (then the per-expert buffers it replaced are returned), MLA absorbs kv_b_proj.
            if isinstance(module, (SparseMoE, MLAttention)):
                module.finish_loading()
                return_freed_memory()
            if isinstance(module, SparseMoE) and module.fused_reason is not None:
                log.info("%s: routed experts run one by one: %s", module.gate.prefix, module.fused_reason)
        model.to(dev)
        model.eval()
        model.set_compute_dtype(compute_dtype)
        _share_tied_table(model, plans)
        if dev.type == "cpu":
            _stream_from_huge_pages(model)
    log.info(
        "loaded %s: %d linear layers, format %s, %s on %s (reading %.2fs, repacking %.2fs)",
        ckpt.path,
        len(plans),
        fmt.name if fmt else "dense",
        compute_dtype,
        dev,
        progress.timings["reading"],
        progress.timings["repacking"],
    )
    return LoadedModel(
        model,
        ckpt,
        fmt,
        config,
        compute_dtype,
        dev,
        plans,
        progress.timings,
        parallel,
        tp,
        {m.prefix: kept_apart.get(m.prefix, m.refusal) for m in merges},
    )


def _share_tied_table(model: CausalLM, plans: list[LayerPlan]) -> None:
    """A head loaded from the tied embedding table serves the embedding's lookups too, where its
    kernel can (`DecoderLM.embed_from_head`); the table's own copy is then freed."""
    head = next((p for p in plans if p.kind == "lm_head"), None)
    if not isinstance(model, DecoderLM) or head is None or head.spec is not None or head.load_as is not None:
        return
    if head.stored.required != (model.tied_weights().get("lm_head.weight"),):
        return  # the checkpoint has its own head
    if model.embed_from_head():
        return_freed_memory()
        log.info("the tied embedding table is read from the LM head's copy (one copy)")


def _stream_from_huge_pages(model: CausalLM) -> None:
    """Move what the CPU kernels stream at every step into huge pages (utils/huge_pages.py), in
    the order a step reads it; the kernels hold their buffers alone, so the old copies are freed."""
    slots = [(m, n) for m in model.modules() if isinstance(m, LinearKernel) for n in m.streamed_buffers]
    moved = huge_pages.relocate(slots)
    if moved:
        log.info("streamed weights in transparent huge pages: %.1f MiB", moved / 2**20)
    elif slots:
        log.info("streamed weights stay in base pages: %s", huge_pages.unavailable_reason() or "none movable")


def _stored_bytes(ckpt: Checkpoint, name: str) -> int:
    info = ckpt.index.info(name)
    return info.numel * info.torch_dtype.itemsize


@dataclass
class _Decoded:
    """One linear layer's weight as this rank holds it, and the kernel class it gets."""

    plan: LayerPlan
    weight: QuantWeight | Tensor
    kernel: type[LinearKernel]
    dtype: torch.dtype
    read: list[str]


def _decode_linear(
    ckpt: Checkpoint,
    fmt: QuantFormat | None,
    plan: LayerPlan,
    dtype: torch.dtype,
    device: torch.device,
    prefer: str | None = None,
    rank: int = 0,
) -> _Decoded:
    """Read, decode and shard one linear layer's weight. Its headers are checked first
    (`check_linear`, as the preflight does), then the values as they are decoded."""
    read = check_linear(ckpt, fmt, plan)
    weight: QuantWeight | Tensor
    shard = plan.shard
    if plan.spec is not None and fmt is not None:
        stored = ckpt.read_many(n for n in read if n != plan.bias)
        weight = fmt.decode(plan.prefix, plan.spec, stored).validate(plan.prefix)
        if weight.shape != plan.shape:  # check_stored rules this out from the headers already
            raise TensorError(
                plan.prefix,
                f"decodes to [out, in] = {list(weight.shape)} but the model expects "
                f"{list(plan.shape)} (from config.json)",
            )
        if shard is not None:
            weight = shard_quant(weight, shard.style, shard.partition, rank, plan.prefix)
    else:
        name = plan.stored.required[0]
        weight = ckpt.read(name) if shard is None else _read_dense_shard(ckpt, name, shard, rank)
        if plan.load_as is not None:
            weight = quantize_rows(weight, plan.load_as)
    if plan.act_as is not None and isinstance(weight, QuantWeight):
        spec = with_activations(weight.spec, plan.kind, plan.act_as)
        weight = weight.with_spec(spec) if spec is not None else weight
    dtype = layer_compute_dtype(plan.kind, dtype)
    kernel_cls = plan.kernel.kernel
    if isinstance(weight, QuantWeight) and weight.spec != plan.kernel_spec:
        # The plan's spec comes from headers; decode may refine it from the data (a g_idx that
        # turns out trivial, zero points that contradict `sym`). Choose again for what we hold.
        again = prefer if shard is None else shard_kernel(shard.style, weight.spec, prefer)
        kernel_cls = choose_kernel(
            weight.spec, plan.kind, device, plan.local_shape, dtype, prefer=again
        ).kernel
        log.info(
            "%s: stored as %s (headers suggested %s); kernel %s",
            plan.prefix,
            weight.spec.describe(),
            plan.local_spec.describe() if plan.local_spec else "unquantized",
            kernel_cls.name,
        )
    return _Decoded(plan, weight, kernel_cls, dtype, read)


def _install(
    layer: QuantLinear,
    kernel_cls: type[LinearKernel],
    weight: QuantWeight | Tensor,
    dtype: torch.dtype,
    device: torch.device,
    bias: Tensor | None,
) -> None:
    kernel = kernel_cls(layer.shape, dtype)
    if kernel_cls.load_on_device:
        weight = weight_to_device(weight, device)
    kernel.load(weight)
    layer.set_kernel(kernel.to(device))
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)


def _read_bias(ckpt: Checkpoint, plan: LayerPlan, rank: int) -> Tensor | None:
    if plan.bias is None:
        return None
    bias = ckpt.read(plan.bias)
    if plan.shard is not None and plan.shard.style == "column":
        bias = shard_vector(bias, plan.shard.partition, rank)
    return bias


def _load_linear(
    ckpt: Checkpoint,
    fmt: QuantFormat | None,
    layer: QuantLinear,
    plan: LayerPlan,
    dtype: torch.dtype,
    device: torch.device,
    prefer: str | None = None,
    rank: int = 0,
) -> list[str]:
    """Load one linear layer; returns the checkpoint tensors it read."""
    d = _decode_linear(ckpt, fmt, plan, dtype, device, prefer, rank)
    _install(layer, d.kernel, d.weight, d.dtype, device, _read_bias(ckpt, plan, rank))
    shard = plan.shard
    if shard is not None and shard.style == "row" and isinstance(d.weight, QuantWeight):
        # (Row layers are never merged: merging stacks output rows of column layers.)
        groups = activation_group_map(plan.spec, d.weight.spec, shard.partition, rank)
        layer.act_groups = None if groups is None else (groups[0].to(device), groups[1])
    return d.read


def _load_merged(
    ckpt: Checkpoint,
    fmt: QuantFormat | None,
    merge: MergePlan,
    layers: dict[str, QuantLinear],
    dtype: torch.dtype,
    device: torch.device,
    prefer: str | None,
    rank: int,
) -> tuple[list[str], str | None]:
    """Load a projection group as one merged layer (the read tensors, None), or, when the values
    rule it out (act-order group indices, static activation scales, specs refined by decoding),
    each member alone (the read tensors, why)."""
    decoded = [_decode_linear(ckpt, fmt, p, dtype, device, prefer, rank) for p in merge.members]
    names = [p.prefix for p in merge.members]
    biases = [_read_bias(ckpt, p, rank) for p in merge.members]
    read = [name for d in decoded for name in d.read]
    weight, reason = concat_out_features(names, [d.weight for d in decoded])
    kernel = decoded[0].kernel
    if reason is None and any(d.kernel is not kernel for d in decoded):
        reason = "decoding gave them different kernels"
    if reason is None and isinstance(weight, QuantWeight):
        again = choose_kernel(
            weight.spec, merge.members[0].kind, device, weight.shape, decoded[0].dtype, prefer
        )
        if again.kernel is not kernel:
            reason = f"the merged weight would run on {again.name}, each member on {kernel.name}"
    if reason is not None or weight is None:
        for d, bias in zip(decoded, biases):
            _install(layers[d.plan.prefix], d.kernel, d.weight, d.dtype, device, bias)
        return read, reason
    merged = MergedLinear(merge.prefix, tuple(layers[n] for n in names))
    bias = None
    if merged.bias is not None:  # a member without a bias adds exact zeros
        bias = torch.cat([b if b is not None else torch.zeros(n) for b, n in zip(biases, merged.parts)])
    _install(merged, kernel, weight, decoded[0].dtype, device, bias)
    for name in names:  # the members hold nothing now (their bias lives in the merged layer)
        layers[name].bias = None
    merge.group.owner.adopt_merged(merge.group, merged)
    return read, None


def _read_dense_shard(ckpt: Checkpoint, name: str, shard: LinearShard, rank: int) -> Tensor:
    """Only this rank's rows (column style) or columns (row style) of a dense weight, zero-padded."""
    dim = 0 if shard.style == "column" else 1
    info = ckpt.index.info(name)
    like = torch.empty([0 if d == dim else n for d, n in enumerate(info.shape)], dtype=info.torch_dtype)
    return gather_segments(
        shard.partition, rank, lambda start, stop: ckpt.read_slice(name, dim, start, stop), dim, like
    )


def _load_plain(
    ckpt: Checkpoint, model: CausalLM, dtype: torch.dtype, device: torch.device, used: set[str]
) -> None:
    """Norms, embeddings and other non-linear parameters, by their module path = checkpoint name.

    Extra parameters that a QuantLinear subclass declares (e.g. a router's score-correction bias)
    load here too, in the layer's own compute dtype (fp32 for routers)."""
    for param in plain_parameters(model, ckpt.index):
        check_plain(ckpt.index.info(param.source), param.shape)
        module = param.module
        if isinstance(module, VocabParallelEmbedding):
            tensor = _read_vocab_rows(ckpt, param.source, module)
        else:
            tensor = ckpt.read(param.source)
        param_dtype = layer_compute_dtype(module.kind, dtype) if isinstance(module, QuantLinear) else dtype
        module._parameters[param.attr] = nn.Parameter(
            tensor.to(device=device, dtype=param_dtype), requires_grad=False
        )
        used.add(param.source)


def _read_vocab_rows(ckpt: Checkpoint, name: str, module: VocabParallelEmbedding) -> Tensor:
    """This rank's rows of the embedding table (zero rows pad the vocab to equal slices); the
    whole table's header was checked by check_plain."""
    info = ckpt.index.info(name)
    like = torch.empty((0, info.shape[1]), dtype=info.torch_dtype)
    return gather_segments(
        module.partition, module.rank, lambda start, stop: ckpt.read_slice(name, 0, start, stop), 0, like
    )


def gather_segments(
    partition: Partition, rank: int, read: Callable[[int, int], Tensor], dim: int, like: Tensor
) -> Tensor:
    """Assemble this rank's slice from `read(start, stop)` reads of only the entries it holds.

    `like`: a zero-size tensor with the full tensor's dtype and the other dimensions' sizes."""
    parts = []
    for s in partition.shards[rank]:
        if s.length:
            parts.append(read(s.start, s.start + s.length))
        if s.pad:
            shape = list(like.shape)
            shape[dim] = s.pad
            parts.append(torch.zeros(shape, dtype=like.dtype))
    if not parts:
        shape = list(like.shape)
        shape[dim] = 0
        return torch.zeros(shape, dtype=like.dtype)
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
