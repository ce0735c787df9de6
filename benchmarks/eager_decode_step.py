"""The eager decode step with its attention layers as one C++ call each against the older path.

Since issue 11 an eager step where every sequence decodes one token runs each attention layer as
one `anyquant_cpu::paged_decode_step` call (K/V store and attention; engine/kv_cache.py). The
older path (two `index_copy_` stores, the step's page plan, the kernel's own per-call checks) is
what such a step ran before, and still runs where the kernel cannot; here it is forced by having
the cache answer a reason (`PagedKVCache.step_kernel_reason`), so both run in one process, in
alternating rounds, on the same requests. Engine steps (`Engine.step()`: scheduler, runner,
sampling) are timed by this thread's CPU time with OMP_NUM_THREADS=1 (a shared machine's waiting
is not counted); medians over rounds. Then, per batch and mode, the torch profiler counts the ops a
step dispatches (exact, not a timing). `--shape overhead` runs the shrunk Qwen2.5-0.5B of
`decode_overhead.py` (every matrix tiny: the step is the engine's own cost).

    OMP_NUM_THREADS=1 python benchmarks/eager_decode_step.py [--model out/bench/dense-w4a16]
        [--shape overhead] [--batches 1 8] [--context 128] [--rounds 7] [--steps 4]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
from collections.abc import Iterator

import torch
from decode_cpu import build  # type: ignore[import-not-found]
from decode_overhead import OVERHEAD_SHAPE  # type: ignore[import-not-found]
from decode_profile import _steps_cpu_ms  # type: ignore[import-not-found]
from decode_step import _drain, _ready  # type: ignore[import-not-found]
from torch.profiler import ProfilerActivity, profile

from anyquant import LLM
from anyquant.engine.kv_cache import PagedKVCache

MODES = ("one-call", "older")
PROFILED_STEPS = 2


def _ops_per_step(llm: LLM) -> float:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            llm.engine.step()
    return sum(e.count for e in prof.key_averages()) / PROFILED_STEPS


@contextlib.contextmanager
def _mode(mode: str) -> Iterator[None]:
    if mode == "one-call":
        yield
        return
    original = PagedKVCache.step_kernel_reason
    PagedKVCache.step_kernel_reason = lambda self: "older path (benchmark)"  # type: ignore[method-assign]
    try:
        yield
    finally:
        PagedKVCache.step_kernel_reason = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="out/bench/dense-w4a16")
    parser.add_argument("--shape", choices=["model", "overhead"], default="model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode per round")
    args = parser.parse_args()
    if args.shape == "overhead":
        args.model = str(build("overhead", OVERHEAD_SHAPE))
    budget = len(MODES) * ((args.steps + 1) * args.rounds + PROFILED_STEPS) + 8
    llm = LLM(
        args.model,
        dtype="bfloat16",
        max_model_len=args.context + budget + 16,
        max_num_seqs=max(args.batches),
        enforce_eager=True,
    )
    vocab = int(llm.loaded.config["vocab_size"])
    times: dict[tuple[int, str], list[float]] = {(b, m): [] for b in args.batches for m in MODES}
    ops: dict[tuple[int, str], float] = {}
    for batch in args.batches:
        _ready(llm, batch, args.context, vocab, max_tokens=budget)
        for round_ in range(args.rounds):
            # Which mode goes first alternates: neither always runs right after the other.
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                with _mode(mode):
                    if round_ == 0:
                        llm.engine.step()  # untimed
                    gc.collect()
                    times[(batch, mode)] += _steps_cpu_ms(llm, args.steps)
        for mode in MODES:
            with _mode(mode):
                ops[(batch, mode)] = _ops_per_step(llm)
        _drain(llm)
    print(
        "| batch | one-call ms (median) | older path ms (median) | older / one-call | ops / step one-call, older |"
    )
    print("|---:|---:|---:|---:|---|")
    for batch in args.batches:
        new, old = (statistics.median(times[(batch, m)]) for m in MODES)
        counts = [ops[(batch, m)] for m in MODES]
        print(json.dumps({"batch": batch, "one_call_ms": new, "older_ms": old, "ops": counts}), flush=True)
        print(f"| {batch} | {new:.2f} | {old:.2f} | {old / new:.3f} | {counts[0]:.0f}, {counts[1]:.0f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
