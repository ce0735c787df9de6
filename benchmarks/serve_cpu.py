"""CPU serving: `anyquant serve` vs sequential `LLM.generate` vs llama.cpp's servers, same model.

One run, one load protocol (anyquant.bench.serve): closed-loop clients at each concurrency level
stream /v1/completions with random token-id prompts, greedy, every request generating exactly
`--max-tokens` tokens. The model is the random-weight Qwen2.5-0.5B-shaped checkpoint of
benchmarks/decode_cpu.py: our server runs its compressed-tensors W4A16 (int4, group 128, LM head
bf16); llama.cpp runs the same bf16 weights converted to GGUF and quantized to Q4_0 (int4, group
32) with the tied embedding / LM head kept in F16 (benchmarks/llamacpp_baseline.py, which needs a
throw-away llama.cpp build; without it those rows are skipped with the reason).

    python benchmarks/serve_cpu.py [--concurrency 1 8 32] [--prompt-len 128] [--max-tokens 32]
        [--llamacpp llama-server llama-cpp-python] [--quant Q4_0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def llamacpp_results(
    plan: ServeBenchPlan, kinds: list[str], quant: str, notes: list[str]
) -> list[LoadResult]:
    reason = llamacpp_baseline.available()
    if reason is not None:
        notes.append(f"llama.cpp skipped: {reason}")
        return []
    gguf = llamacpp_baseline.ensure_gguf(
        OUT / "dense-bf16", quant, tokenizer_to=[plan.model], token_embedding_type="F16"
    )
    levels = prompts_for_levels(plan, default_token_range(plan.model))
    results: list[LoadResult] = []
    for kind in kinds:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = llamacpp_baseline.server_command(
            gguf,
            port,
            threads=torch.get_num_threads(),
            parallel=max(plan.concurrency),
            ctx_per_slot=plan.prompt_len + plan.max_tokens + 16,
            kind=kind,
        )
        # llama-cpp-python has no ignore_eos: the same effect through a logit bias.
        extra = (
            {"logit_bias": llamacpp_baseline.eos_logit_bias(DENSE["vocab_size"])}
            if kind == "llama-cpp-python"
            else None
        )
        name = f"llama.cpp {kind} ({gguf.stem.removeprefix('dense-')})"
        log = plan.log_dir / f"{kind}.log"
        with ServerProcess(command, url, name, log, health_path="/v1/models") as server:
            notes.append(f"{name} ready after {server.startup_s:.1f}s")
            for clients, prompts in levels.items():
                result = asyncio.run(run_load(url, name, prompts, clients, plan.max_tokens, extra_body=extra))
                show(result)
                results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--llamacpp", nargs="*", default=["llama-server"], choices=llamacpp_baseline.KINDS)
    parser.add_argument("--quant", default="Q4_0", help="llama-quantize type for the GGUF")
    parser.add_argument("--no-sequential", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT / "serve_cpu.json")
    args = parser.parse_args()

    model = build("dense", DENSE)
    vocab = int(DENSE["vocab_size"])
    llamacpp_baseline.ensure_tokenizer([model], vocab)  # our server needs one, llama.cpp or not
    plan = ServeBenchPlan(
        model=model,
        concurrency=args.concurrency,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        sequential=not args.no_sequential,
        dtype="bfloat16",
        log_dir=OUT / "logs",
    )

    print(results_table([]), flush=True)
    results, notes = run_serve_bench(plan, on_result=show)
    results += llamacpp_results(plan, args.llamacpp, args.quant, notes)
    print()
    print(results_table(results))
    for note in notes:
        print(f"note: {note}")
    args.out.write_text(json.dumps({"notes": notes, "results": results_json(results)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
