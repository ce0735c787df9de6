"""Long-prompt prefill through the engine, chunk by chunk: tok/s per chunk and where its time goes.

The engine runs at most `max_num_batched_tokens` (2048) prompt tokens per step, so a 4096-token
prompt is two steps, the second attending to the 2048 keys the first one cached. For each prompt
length this drives `Engine.step()` on one request of fresh random token ids (prefix caching would
otherwise skip the repeated prompt) with max_tokens=1, and records each step's prompt tokens and
this thread's CPU time (run with OMP_NUM_THREADS=1: all the work is on this thread, so a shared
machine's waiting is not counted); medians over `--repeats` prompts after one warm-up prompt (of the first length).
`--profile` then runs one more prompt per length under torch.profiler and prints, per chunk, the
ops' self CPU time by share (the profiler's times are wall clock; the shares are what to read on a
busy machine).

    OMP_NUM_THREADS=1 python benchmarks/prefill_chunks.py [--model out/bench/dense-w4a16]
        [--lengths 512 2048 4096] [--repeats 3] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from anyquant import LLM, SamplingParams


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (length,), generator=g).tolist()


def run_prompt(llm: LLM, prompt: list[int], request_id: str) -> list[tuple[int, float]]:
    """(prompt tokens, CPU seconds) of each engine step until the request's prompt is computed."""
    engine = llm.engine
    engine.add_request(
        prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), request_id=request_id
    )
    steps = []
    while engine.has_unfinished():
        computed = sum(r.num_computed_tokens for r in engine.scheduler.running)
        c0 = time.thread_time()
        engine.step()
        cpu = time.thread_time() - c0
        running = {r.request_id: r.num_computed_tokens for r in engine.scheduler.running}
        done = running.get(request_id, len(prompt))
        steps.append((done - computed, cpu))
    return steps


def profile_prompt(llm: LLM, prompt: list[int], request_id: str, top: int) -> list[dict[str, object]]:
    """Per chunk: the top ops by self CPU time (the profiler's clock) and their shares."""
    engine = llm.engine
    engine.add_request(
        prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), request_id=request_id
    )
    chunks = []
    while engine.has_unfinished():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.step()
        by_op: Counter[str] = Counter()
        for e in prof.key_averages():
            by_op[e.key] += e.self_cpu_time_total
        total = sum(by_op.values())
        chunks.append(
            {
                "total_ms": total / 1e3,
                "ops": [(k, v / 1e3, v / total) for k, v in by_op.most_common(top)],
            }
        )
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="out/bench/dense-w4a16")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    llm = LLM(args.model, dtype="bfloat16", max_model_len=max(args.lengths) + 16, max_num_seqs=4)
    vocab = llm.engine.runner.model.args.vocab_size
    results: dict[str, object] = {"threads": torch.get_num_threads()}
    seed = 0
    for length in args.lengths:
        runs = []
        warm_up = length == args.lengths[0]  # once per process: the kernels' and allocator's first use
        for i in range(args.repeats + warm_up):
            seed += 1
            steps = run_prompt(llm, _prompt(length, vocab, seed), f"p{length}-{i}")
            if i >= warm_up:
                runs.append(steps)
        chunks = []
        for c in range(len(runs[0])):
            tokens = runs[0][c][0]
            cpu = statistics.median(r[c][1] for r in runs)
            chunks.append({"tokens": tokens, "cpu_s": cpu, "tok_s": tokens / cpu if tokens else 0.0})
        total_tokens = sum(c["tokens"] for c in chunks)
        total_cpu = sum(c["cpu_s"] for c in chunks)
        entry: dict[str, object] = {"chunks": chunks, "tok_s": total_tokens / total_cpu}
        line = ", ".join(f"{c['tokens']} tok {c['cpu_s']:.2f} s = {c['tok_s']:.1f} tok/s" for c in chunks)
        print(
            f"prompt {length}: {total_tokens / total_cpu:.1f} tok/s (CPU time, median of {args.repeats}); {line}"
        )
        if args.profile:
            seed += 1
            entry["profile"] = profile_prompt(llm, _prompt(length, vocab, seed), f"prof{length}", args.top)
            for c, chunk in enumerate(entry["profile"]):  # type: ignore[arg-type]
                print(f"  chunk {c}: profiled {chunk['total_ms']:.0f} ms")
                for name, ms, share in chunk["ops"]:
                    print(f"    {share:6.1%} {ms:9.1f} ms  {name}")
        results[str(length)] = entry
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
