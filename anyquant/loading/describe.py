"""Describe a checkpoint without reading tensor data: format, per-layer scheme, kernel, notes.

Refuses, with the loader's own message, any checkpoint whose headers the loader would refuse.
Owns the JSON document that `anyquant inspect --json` prints and the grouping of layers that
share a pattern and a scheme; with `tp`, the per-rank view: shapes, padding, the tensor-parallel
sizes that work, memory per rank and known risks. It uses the same plans as the loader (layer
plan, tensor-parallel preflight), so what it says is what loading will do.
"""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from anyquant.errors import AnyquantError
from anyquant.layers.decode_kernel import describe_decode_attention
from anyquant.layers.kv_quant import cache_dtype
from anyquant.layers.linear import QuantLinear
from anyquant.loading.activations import activation_quant
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.dtype_policy import dtype_risks
from anyquant.loading.lm_head import held_bytes, lm_head_spec
from anyquant.loading.loader import build_on_meta, resolve_dtype, trained_dtype
from anyquant.loading.merge import MergePlan, plan_merges
from anyquant.loading.plan import LayerPlan, plan_layers
from anyquant.loading.preflight import (
    TensorParallelPlan,
    check_expert_parallel,
    padding_report,
    plan_tensor_parallel,
    spec_lookup,
    tensor_parallel_sizes,
)
from anyquant.loading.sources import open_checkpoint
from anyquant.loading.validate import check_checkpoint
from anyquant.models.multimodal import ENCODER_CACHE_BYTES, MultimodalModel
from anyquant.models.protocol import CausalLM
from anyquant.models.registry import architecture_of
from anyquant.quant.detect import detect_format
from anyquant.quant.spec import QuantSpec
from anyquant.utils.devices import check_cuda_available, describe_device


def layer_pattern(prefix: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", prefix)


def spec_json(spec: QuantSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    out = asdict(spec)
    out["extra"] = dict(spec.extra)  # the format's own words, e.g. {"gguf type": "Q4_K"}
    out["bits"] = spec.bits
    out["description"] = spec.describe()
    return out


def check_tensor_parallel(
    path: str | Path, world: int, mmproj: str | Path | None = None, expert_parallel: bool = False
) -> TensorParallelPlan:
    """The tensor-parallel plan for `world` ranks from headers; UnsupportedError says why not."""
    ckpt = open_checkpoint(path, mmproj)
    model = build_on_meta(ckpt.text_config(), ckpt.index.names())
    return plan_tensor_parallel(model, spec_lookup(detect_format(ckpt)), world, expert_parallel)


def describe_checkpoint(
    path: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    kernel: str | None = None,
    tp: int = 1,
    max_model_len: int | None = None,
    lm_head_dtype: str = "auto",
    activation_dtype: str = "auto",
    mmproj: str | Path | None = None,
    expert_parallel: bool = False,
    kv_cache_dtype: str = "auto",
) -> dict[str, Any]:
    ckpt = open_checkpoint(path, mmproj)
    config = ckpt.text_config()
    fmt = detect_format(ckpt)
    dev = torch.device(device)
    if dev.type == "cuda":
        check_cuda_available(dev)  # a simulated device (inspect --compute-capability) passes
    compute_dtype = resolve_dtype(dtype, config, dev)
    model = build_on_meta(config, ckpt.index.names())
    tp_plan, tp_error = None, None
    try:
        if expert_parallel:
            check_expert_parallel(model)
        if tp != 1:
            tp_plan = plan_tensor_parallel(model, spec_lookup(fmt), tp, expert_parallel)
    except AnyquantError as exc:
        tp_error = str(exc)
    plans = plan_layers(
        ckpt,
        fmt,
        model,
        dev,
        compute_dtype,
        kernel,
        tp=tp_plan,
        lm_head_as=lm_head_spec(lm_head_dtype),
        activations=activation_quant(activation_dtype),
    )
    # Every header check the loader makes: a checkpoint inspect passes is one that loads.
    check_checkpoint(ckpt, fmt, model, plans)
    merges = plan_merges(model, plans, dev, compute_dtype, kernel)
    source = ckpt.quant_config()
    groups: dict[tuple[str, str, str, str], list[LayerPlan]] = {}
    for plan in plans:
        key = (
            layer_pattern(plan.prefix),
            plan.spec.describe() if plan.spec else "unquantized",
            plan.kernel.name,
            split_label(plan, tp_plan),
        )
        groups.setdefault(key, []).append(plan)
    group_docs = []
    total_bytes = 0
    for (pattern, _, _, split), members in groups.items():
        first = members[0]
        stored: dict[str, str] = {}
        nbytes = 0
        for plan in members:
            for name in plan.stored.all():
                info = ckpt.index.get(name)
                if info is None:
                    continue
                # A head quantized at load is held (and read per token) as codes + fp32 scales.
                held = (
                    held_bytes(plan.load_as, *plan.shape)
                    if plan.load_as
                    else info.numel * info.torch_dtype.itemsize
                )
                nbytes += held
                if plan is first:
                    stored[name.removeprefix(plan.prefix + ".")] = f"{info.dtype}{list(info.shape)}"
        total_bytes += nbytes
        group_docs.append(
            {
                "pattern": pattern,
                "count": len(members),
                "layers": [p.prefix for p in members],
                "kind": first.kind,
                "shape": list(first.shape) if all(p.shape == first.shape for p in members) else None,
                "scheme": spec_json(first.spec),
                "stored": stored,
                "bytes": nbytes,
                "kernel": first.kernel.name,
                "rejected_kernels": [{"kernel": k, "reason": r} for k, r in first.kernel.rejected],
                "split": split,
                "local_shape": list(first.local_shape)
                if all(p.local_shape == first.local_shape for p in members)
                else None,
                "local_scheme": spec_json(first.local_spec),
                "quantized_at_load": spec_json(first.load_as),
                "activations_at_load": first.act_as.describe() if first.act_as else None,
            }
        )
    risks = dtype_risks(compute_dtype, trained_dtype(config), dev, tp)
    if tp_plan is not None:
        risks += tp_plan.risks
    length = max_model_len or int(config.get("max_position_embeddings", 2048))
    kv_dtype = cache_dtype(kv_cache_dtype, compute_dtype)
    model.cache_shape.check_cache_dtype(
        kv_dtype, str((config.get("architectures") or [type(model).__name__])[0])
    )
    memory = memory_per_rank(ckpt, model, plans, tp_plan, compute_dtype, length, kv_dtype)
    vision = vision_report(model, plans, ckpt.path)
    if vision is not None:  # rank 0 keeps encoder outputs for images in flight and repeated ones
        memory["encoder_cache"] = vision["encoder_cache_bytes"]
        memory["total"] += vision["encoder_cache_bytes"]
        cross = getattr(model, "cross_attention_summary", None)
        if cross is not None:  # kept per running request with images, outside the KV cache
            heads = tp_plan.cache_heads if tp_plan is not None and tp_plan.cache_heads else None
            vision["cross_attention"] = cross(compute_dtype.itemsize, heads)
    tp_doc = {
        "size": tp,
        "ok": tp_error is None,
        "reason": tp_error,
        "sizes": {str(k): v for k, v in tensor_parallel_sizes(model, spec_lookup(fmt)).items()},
        "padding": padding_report(tp_plan, layer_pattern) if tp_plan else [],
        "memory_per_rank": memory,
        "expert_parallel": expert_placement_report(tp_plan, expert_parallel),
    }
    return {
        "model": str(ckpt.path),
        "architecture": architecture_of(config),
        "format": None
        if fmt is None
        else {
            "name": fmt.name,
            "description": fmt.describe(),
            "config_source": source.where if source else None,
        },
        "device": describe_device(dev),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "notes": list(fmt.notes) if fmt else [],
        "risks": risks,
        "tensor_parallel": tp_doc,
        "vision": vision,
        "groups": group_docs,
        "moe_layers": moe_docs(model, plans),
        "merged_projections": merge_docs(merges),
        # (an int8 cache is asked for as the cache's dtype: the kernel's answer depends on it)
        "decode_attention": describe_decode_attention(
            dev, compute_dtype, model.cache_shape.k_dim, model.cache_shape.v_dim, cache_dtype=kv_dtype
        ),
        "unquantized_layers": [p.prefix for p in plans if p.spec is None],
        "totals": {
            "linear_layers": len(plans),
            "quantized_layers": sum(p.spec is not None for p in plans),
            "linear_weight_bytes": total_bytes,
            "checkpoint_tensors": len(ckpt.index),
        },
    }


def moe_docs(model: Any, plans: list[LayerPlan]) -> list[dict[str, Any]]:
    """Per MoE block pattern: its routed experts as one fused call per layer, or per expert and why
    (the loader's decision, predicted from the plan; static input scales are checked at load)."""
    from anyquant.layers.moe import SparseMoE
    from anyquant.quant.kernels.avx512_moe import FUSED_CALLS, fusion_from_plan

    by_prefix = {p.prefix: p for p in plans}
    docs: dict[tuple[str, str | None], dict[str, Any]] = {}
    for block in model.modules():
        if not isinstance(block, SparseMoE):
            continue
        mine = [p for name, p in by_prefix.items() if name.startswith(f"{block.prefix}.experts.")]
        if not mine:
            continue
        kernels = {p.kernel.name for p in mine}
        reason = fusion_from_plan(
            kernels,
            {p.local_spec for p in mine},
            block.act_name,
            any(p.bias is not None for p in mine),
        )
        key = (layer_pattern(block.prefix), reason)
        doc = docs.setdefault(
            key,
            {
                "pattern": key[0],
                "count": 0,
                "experts": block.routing.num_experts,
                "fused": reason is None,
                "call": FUSED_CALLS[next(iter(kernels))] if reason is None else None,
                "reason": reason,
            },
        )
        doc["count"] += 1
    return list(docs.values())


def split_label(plan: LayerPlan, tp: TensorParallelPlan | None) -> str:
    """column / row (split), whole experts on their owner rank (expert parallelism), or replicated."""
    if plan.shard is not None:
        return plan.shard.style
    if tp is not None and plan.prefix in tp.expert_owner:
        return "whole expert on one rank"
    return "replicated"


def expert_placement_report(plan: TensorParallelPlan | None, enabled: bool) -> dict[str, Any]:
    """Which routed experts each rank holds, by MoE block pattern (blocks alike share one line)."""
    rows: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    for prefix, placement in (plan.experts if plan is not None else {}).items():
        key = (layer_pattern(prefix), (*placement.starts, placement.num_experts))
        entry = rows.setdefault(
            key,
            {
                "pattern": key[0],
                "count": 0,
                "experts": placement.num_experts,
                "per_rank": [[r.start, r.stop] for r in map(placement.experts, range(placement.world))],
                "description": placement.describe(),
            },
        )
        entry["count"] += 1
    return {"enabled": enabled, "placement": list(rows.values())}


def merge_docs(merges: list[MergePlan]) -> list[dict[str, Any]]:
    """Projection groups by pattern: merged into one kernel call, or kept apart and why. An
    act-order group merges only if its members' group indices turn out equal when loaded."""
    docs: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for m in merges:
        key = (layer_pattern(m.prefix), m.kernel, m.refusal)
        if key not in docs:
            act_order = any(p.local_spec is not None and p.local_spec.act_order for p in m.members)
            docs[key] = {
                "pattern": key[0],
                "members": [p.prefix.rsplit(".", 1)[-1] for p in m.members],
                "count": 0,
                "merged": m.refusal is None,
                "kernel": m.kernel,
                "local_shape": list(m.local_shape),
                "reason": m.refusal
                or (
                    "if the members' act-order group indices are equal (checked at load)"
                    if act_order
                    else None
                ),
            }
        docs[key]["count"] += 1
    return list(docs.values())


def vision_report(model: Any, plans: list[LayerPlan], path: Path) -> dict[str, Any] | None:
    """For a model that takes images: its vision layers (every linear layer outside the decoder
    body but the LM head), the placeholder token and the tokens an image takes, the encoder cache."""
    if not isinstance(model, MultimodalModel):
        return None
    processor = model.image_processor(path)
    body = getattr(model, "body_path", "model") + "."
    vision = [p for p in plans if not p.prefix.startswith(body) and p.kind != "lm_head"]
    return {
        "linear_layers": len(vision),
        "quantized_layers": sum(p.spec is not None for p in vision),
        "kernels": sorted({p.kernel.name for p in vision}),
        "placeholder_token_id": processor.image_token_id,
        "tokens_per_448x448_image": processor.num_tokens_for(448, 448),
        "max_tokens_per_image": processor.max_tokens_per_image,
        "encoder_cache_bytes": ENCODER_CACHE_BYTES,
    }


def memory_per_rank(
    ckpt: Checkpoint,
    model: CausalLM,
    plans: list[LayerPlan],
    tp: TensorParallelPlan | None,
    compute_dtype: torch.dtype,
    max_model_len: int,
    kv_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Estimated bytes rank 0 (the largest share) holds: its share of the linear weights (quantized layers at their
    stored size, dense ones in the compute dtype), other parameters, and the KV cache in `kv_dtype`
    (default: the compute dtype; int8 rows count their scales)."""
    kv_dtype = kv_dtype or compute_dtype
    itemsize = compute_dtype.itemsize
    linear = 0
    for plan in plans:
        if tp is not None and not tp.holds(plan.prefix, 0):
            continue  # expert parallelism: a routed expert rank 0 (which holds the most) leaves out
        out_l, in_l = plan.local_shape
        share = (out_l * in_l) / max(plan.shape[0] * plan.shape[1], 1)
        if plan.load_as is not None:  # codes and fp32 scales (loading/lm_head.py)
            linear += held_bytes(plan.load_as, out_l, in_l)
        elif plan.spec is None:
            linear += out_l * in_l * itemsize
        else:
            stored = sum(
                info.numel * info.torch_dtype.itemsize
                for n in plan.stored.all()
                if (info := ckpt.index.get(n))
            )
            linear += int(stored * share)
    other = itemsize * sum(
        param.numel()
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if not (isinstance(module, QuantLinear) and name == "bias")  # biases: counted as replicated below
    )
    other += itemsize * sum(
        p.bias.numel() for p in model.modules() if isinstance(p, QuantLinear) and p.bias is not None
    )
    vocab = next((s.partition for s in tp.splits if s.group.role == "vocab"), None) if tp else None
    if vocab is not None:  # the embedding table is vocab-parallel like the LM head
        rows = model.args.hidden_size * itemsize  # the embedding table's width
        other -= (vocab.size - vocab.local_size) * rows
    shape = model.cache_shape
    heads = tp.cache_heads if tp is not None and tp.cache_heads is not None else shape.num_kv_heads
    per_token = model.args.num_layers * replace(shape, num_kv_heads=heads).token_bytes(kv_dtype)
    kv = per_token * max_model_len
    return {
        "linear_weights": linear,
        "other_weights": other,
        "kv_cache_dtype": str(kv_dtype).removeprefix("torch."),
        "kv_cache_per_token": per_token,
        "max_model_len": max_model_len,
        "kv_cache_at_max_model_len": kv,
        "total": linear + other + kv,
    }
