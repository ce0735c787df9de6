"""`anyquant bench offline MODEL` (prefill and batch-1 decode throughput, load time, memory) and
`anyquant bench serve MODEL` (throughput and time to first token under concurrent clients, side by
side with sequential generation and any other OpenAI-compatible server given as a baseline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anyquant.cli.flags import ENFORCE_EAGER_HELP, EXPERT_PARALLEL_HELP, add_kv_cache_dtype, add_lm_head_dtype
from anyquant.errors import AnyquantError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    offline = sub.add_parser("offline", help="prompt tokens/s and batch-1 decode tokens/s of one model")
    offline.add_argument("model")
    offline.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    offline.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    offline.add_argument("--prompt-len", type=int, default=128)
    offline.add_argument("--decode-len", type=int, default=32)
    offline.add_argument("--repeats", type=int, default=3)
    offline.add_argument("--kernel", default=None, help="force a kernel for quantized layers")
    offline.add_argument(
        "--tensor-parallel-size", "--tp", type=int, default=1, metavar="N", help="run N tensor-parallel ranks"
    )
    offline.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help=EXPERT_PARALLEL_HELP,
    )
    add_lm_head_dtype(offline)
    add_kv_cache_dtype(offline)
    offline.add_argument(
        "--activation-dtype",
        default="auto",
        choices=["auto", "int8"],
        help="int8: per-token int8 activations for weight-only layers (int8 dot products)",
    )
    offline.add_argument("--json", action="store_true")

    serve = sub.add_parser(
        "serve",
        help="throughput and time to first token of `anyquant serve` under 1..N concurrent clients",
        description=(
            "Starts `anyquant serve MODEL` on a free loopback port, streams the same closed-loop load "
            "at every concurrency level (random token-id prompts, greedy, ignore_eos, fixed max "
            "tokens), stops it, then measures the same load served one request at a time in-process "
            "(sequential LLM.generate) and on every --baseline server."
        ),
    )
    serve.add_argument("model")
    serve.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    serve.add_argument(
        "--requests", type=int, default=None, help="requests per level (default: max(clients, 4))"
    )
    serve.add_argument("--prompt-len", type=int, default=128)
    serve.add_argument("--max-tokens", type=int, default=32)
    serve.add_argument(
        "--token-range",
        type=int,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="prompt token ids are drawn from [LOW, HIGH) (default: the tokenizer's vocabulary)",
    )
    serve.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="also measure an already running OpenAI-compatible server (repeatable)",
    )
    serve.add_argument("--no-sequential", action="store_true", help="skip the in-process sequential run")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_lm_head_dtype(serve)
    add_kv_cache_dtype(serve)
    serve.add_argument("--enforce-eager", action="store_true", help=ENFORCE_EAGER_HELP)
    serve.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `anyquant serve` (repeatable), e.g. --server-arg=--kv-cache-gb=2",
    )
    serve.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    serve.add_argument(
        "--log-dir", type=Path, default=Path("out/bench/logs"), help="where the server's log goes"
    )


def run(args: argparse.Namespace) -> int:
    if args.bench == "serve":
        return _run_serve(args)
    from anyquant.bench.offline import bench_offline, measure_copy_bandwidth_gbs
    from anyquant.cli.llm_options import llm_options

    result = bench_offline(
        args.model,
        prompt_len=args.prompt_len,
        decode_len=args.decode_len,
        repeats=args.repeats,
        **llm_options(args),  # the flags bench_offline passes on to LLM(...)
    )
    bandwidth = measure_copy_bandwidth_gbs(device=args.device)
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


def _run_serve(args: argparse.Namespace) -> int:
    from anyquant.bench.serve_session import ServeBenchPlan, run_serve_bench

    baselines = []
    for entry in args.baseline:
        name, sep, url = entry.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise AnyquantError(f"--baseline {entry!r}: expected NAME=http://host:port")
        baselines.append((name, url.rstrip("/")))
    plan = ServeBenchPlan(
        model=Path(args.model),
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        token_range=tuple(args.token_range) if args.token_range else None,
        baselines=baselines,
        sequential=not args.no_sequential,
        dtype=args.dtype,
        lm_head_dtype=args.lm_head_dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        server_args=args.server_arg,
        enforce_eager=args.enforce_eager,
        log_dir=args.log_dir,
    )
    results, notes = run_serve_bench(plan)
    from anyquant.bench.serve import results_json, results_table

    print(results_table(results))
    for note in notes:
        print(f"note: {note}")
    if args.json is not None:
        args.json.write_text(json.dumps({"notes": notes, "results": results_json(results)}, indent=2))
    return 0
