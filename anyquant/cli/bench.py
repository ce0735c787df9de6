"""`anyquant bench offline MODEL`: prefill and batch-1 decode throughput, load time, memory."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    offline = sub.add_parser("offline", help="prompt tokens/s and batch-1 decode tokens/s of one model")
    offline.add_argument("model")
    offline.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    offline.add_argument("--prompt-len", type=int, default=128)
    offline.add_argument("--decode-len", type=int, default=32)
    offline.add_argument("--repeats", type=int, default=3)
    offline.add_argument("--kernel", default=None, help="force a kernel for quantized layers")
    offline.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from anyquant.bench.offline import bench_offline, measure_copy_bandwidth_gbs

    result = bench_offline(
        args.model, args.dtype, args.prompt_len, args.decode_len, args.repeats, args.kernel
    )
    bandwidth = measure_copy_bandwidth_gbs()
    limit = bandwidth * 1e9 / (result.linear_weight_mib * 2**20)
    doc = {**result.as_dict(), "copy_bandwidth_gbs": bandwidth, "decode_bandwidth_limit_tok_s": limit}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{result.model}  [{result.format}, {result.dtype}, {result.threads} threads]")
    print(f"  load            {result.load_s:8.2f} s")
    print(f"  prefill         {result.prefill_tok_s:8.1f} tok/s  (prompt {result.prompt_len})")
    print(f"  decode (batch 1){result.decode_tok_s:8.1f} tok/s  ({result.decode_len} tokens)")
    print(
        f"  bandwidth limit {limit:8.1f} tok/s  ({result.linear_weight_mib:.1f} MiB linear weights "
        f"per token at {bandwidth:.1f} GB/s copy bandwidth)"
    )
    print(f"  peak RSS        {result.peak_rss_mib:8.1f} MiB")
    return 0
