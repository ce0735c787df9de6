"""`anyquant inspect MODEL`: what each layer is, which kernel runs it and why, from headers only."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--device", default="cpu", help="device the kernel choice is made for")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--kernel", default=None, help="pretend this kernel is forced for quantized layers")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def print_text(doc: dict[str, Any]) -> None:
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
        stored = ", ".join(f"{k} {v}" for k, v in g["stored"].items())
        print(f"    stored: {stored}  ({_mib(g['bytes'])})")
        print(f"    kernel: {g['kernel']}")
        for r in g["rejected_kernels"]:
            print(f"      not {r['kernel']}: {r['reason']}")
    if doc["notes"]:
        print("\nconfig and tensors disagree (tensors win):")
        for note in doc["notes"]:
            print(f"  - {note}")


def run(args: argparse.Namespace) -> int:
    from anyquant.loading.describe import describe_checkpoint

    doc = describe_checkpoint(args.model, device=args.device, dtype=args.dtype, kernel=args.kernel)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_text(doc)
    return 0
