"""`anyquant inspect MODEL [--tp N]`: what each layer is, which kernel runs it and why, and how it
splits over N tensor-parallel ranks, from headers only. Exits 1, reason first, when the model
cannot run as asked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from anyquant.cli.flags import add_kv_cache_dtype, add_lm_head_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--device", default="cpu", help="device the kernel choice is made for")
    parser.add_argument(
        "--compute-capability",
        default=None,
        metavar="X.Y",
        help="with --device cuda: plan for a GPU of this compute capability (e.g. 7.5 for a T4), "
        "without one present",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--kernel", default=None, help="pretend this kernel is forced for quantized layers")
    parser.add_argument(
        "--tp", type=int, default=1, metavar="N", help="plan N tensor-parallel ranks (per-rank view)"
    )
    parser.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="with --tp N: plan whole routed experts per rank instead of a slice of every expert",
    )
    add_lm_head_dtype(parser)
    add_kv_cache_dtype(parser)
    parser.add_argument(
        "--activation-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="plan int8 per-token activations for weight-only layers",
    )
    parser.add_argument(
        "--mmproj",
        default=None,
        metavar="FILE",
        help="a GGUF model's vision projector (llama.cpp's mmproj file)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="KV-cache length for the memory estimate (default: the model's)",
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def print_text(doc: dict[str, Any]) -> None:
    tp = doc["tensor_parallel"]
    if not tp["ok"]:
        print(f"cannot run with tensor-parallel size {tp['size']}: {tp['reason']}\n")
    fmt = doc["format"]
    print(f"model:        {doc['model']}")
    print(f"architecture: {doc['architecture']}")
    if fmt:
        print(f"format:       {fmt['description']}  (config from {fmt['config_source']})")
    else:
        print("format:       unquantized")
    print(f"kernels for:  {doc['device']}, compute dtype {doc['compute_dtype']}")
    totals = doc["totals"]
    print(
        f"layers:       {totals['quantized_layers']} of {totals['linear_layers']} linear layers quantized, "
        f"{_mib(totals['linear_weight_bytes'])} of linear weights"
    )
    print()
    for g in doc["groups"]:
        scheme = g["scheme"]["description"] if g["scheme"] else "unquantized"
        shape = "x".join(map(str, g["shape"])) if g["shape"] else "mixed shapes"
        print(f"{g['pattern']}  ×{g['count']}  [{shape}]  {scheme}")
        if g["split"] != "replicated" or tp["size"] > 1:
            local = "x".join(map(str, g["local_shape"])) if g["local_shape"] else "mixed shapes"
            local_scheme = g["local_scheme"]["description"] if g["local_scheme"] else "unquantized"
            changed = f", {local_scheme}" if local_scheme != scheme else ""
            print(f"    per rank: {g['split']} [{local}]{changed}")
        stored = ", ".join(f"{k} {v}" for k, v in g["stored"].items())
        print(f"    stored: {stored}  ({_mib(g['bytes'])})")
        if g["quantized_at_load"]:
            print(f"    quantized at load: {g['quantized_at_load']['description']} (--lm-head-dtype)")
        if g.get("activations_at_load"):
            print(f"    activations: {g['activations_at_load']} (--activation-dtype)")
        if g["scheme"] and g["scheme"].get("extra"):
            print("    format: " + ", ".join(f"{k} {v}" for k, v in g["scheme"]["extra"].items()))
        print(f"    kernel: {g['kernel']}")
        for r in g["rejected_kernels"]:
            print(f"      not {r['kernel']}: {r['reason']}")
    for moe in doc["moe_layers"]:
        how = (
            f"one fused call per layer: {moe['call']}"
            if moe["fused"]
            else f"one expert at a time: {moe['reason']}"
        )
        print(f"routed experts: {moe['pattern']} (×{moe['count']}, {moe['experts']} experts): {how}")
    attn = doc["decode_attention"]
    print(f"decode attention: {attn['kernel']}" + (f" ({attn['reason']})" if attn["reason"] else ""))
    print_merges(doc["merged_projections"])
    if doc["notes"]:
        print("\nconfig and tensors disagree (tensors win):")
        for note in doc["notes"]:
            print(f"  - {note}")
    vision = doc.get("vision")
    if vision:
        print(
            f"\nimages: vision layers {vision['quantized_layers']} of {vision['linear_layers']} quantized "
            f"(kernels {', '.join(vision['kernels'])}); placeholder token {vision['placeholder_token_id']}; "
            f"a 448x448 image takes {vision['tokens_per_448x448_image']} tokens, one image at most "
            f"{vision['max_tokens_per_image']}; encoder cache up to {_mib(vision['encoder_cache_bytes'])}"
        )
        cross = vision.get("cross_attention")
        if cross:
            print(
                f"  cross-attention layers {cross['layers']}: each image adds {cross['keys_per_image']} keys, "
                f"{_mib(cross['kv_bytes_per_image'])} of keys/values per running request (outside the KV cache)"
            )
    print_tensor_parallel(tp)
    if doc["risks"]:
        print("\nrisks:")
        for risk in doc["risks"]:
            print(f"  - {risk}")


def print_merges(merges: list[dict[str, Any]]) -> None:
    if merges:
        print("\nmerged projections (one kernel call for several projections of the same input):")
    for m in merges:
        members = "+".join(m["members"])
        shape = "x".join(map(str, m["local_shape"]))
        if m["merged"]:
            when = f", {m['reason']}" if m["reason"] else ""
            print(f"  {m['pattern']}  ×{m['count']}  {members} -> [{shape}] on {m['kernel']}{when}")
        else:
            print(f"  {m['pattern']}  ×{m['count']}  {members} kept apart: {m['reason']}")


def print_tensor_parallel(tp: dict[str, Any]) -> None:
    works = [k for k, why in tp["sizes"].items() if why is None]
    print(f"\ntensor-parallel sizes that work: {', '.join(works) or 'none'}")
    for size, why in tp["sizes"].items():
        if why is not None:
            print(f"  not {size}: {why}")
    for pad in tp["padding"]:
        print(
            f"padding: {pad['pattern']} ({pad['role']}, ×{pad['count']}): {pad['size']} -> {pad['local_size']} "
            f"per rank in units of {pad['unit']}, zero entries per rank {pad['padding_per_rank']}"
        )
    for place in tp["expert_parallel"]["placement"]:
        print(f"expert parallel: {place['pattern']} (×{place['count']}): {place['description']}")
    mem = tp["memory_per_rank"]
    print(
        f"memory per rank (estimate, tp={tp['size']}): {_mib(mem['total'])} = linear weights "
        f"{_mib(mem['linear_weights'])} + other weights {_mib(mem['other_weights'])} + KV cache "
        f"{_mib(mem['kv_cache_at_max_model_len'])} at {mem['max_model_len']} tokens "
        f"({mem['kv_cache_per_token']} bytes per token, {mem['kv_cache_dtype']})"
        + (f" + encoder cache {_mib(mem['encoder_cache'])} (rank 0)" if "encoder_cache" in mem else "")
    )


def run(args: argparse.Namespace) -> int:
    import contextlib

    from anyquant.errors import AnyquantError
    from anyquant.loading.describe import describe_checkpoint
    from anyquant.utils.devices import parse_capability, simulated_cuda

    device: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if args.compute_capability is not None:
        if not args.device.startswith("cuda"):
            raise AnyquantError(f"--compute-capability describes a CUDA device; --device is {args.device}")
        try:
            device = simulated_cuda(parse_capability(args.compute_capability))
        except ValueError as exc:
            raise AnyquantError(f"--compute-capability: {exc}") from None
    with device:
        doc = _describe(args, describe_checkpoint)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_text(doc)
    return 0 if doc["tensor_parallel"]["ok"] else 1


def _describe(args: argparse.Namespace, describe_checkpoint: Any) -> dict[str, Any]:
    return describe_checkpoint(
        args.model,
        device=args.device,
        dtype=args.dtype,
        kernel=args.kernel,
        tp=args.tp,
        max_model_len=args.max_model_len,
        lm_head_dtype=args.lm_head_dtype,
        activation_dtype=args.activation_dtype,
        mmproj=args.mmproj,
        expert_parallel=args.enable_expert_parallel,
        kv_cache_dtype=args.kv_cache_dtype,
    )
