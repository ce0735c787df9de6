"""Where a decode step's time goes, for several engine variants measured in alternation.

Loads the Qwen2.5-0.5B-shaped W4A16 checkpoint (`benchmarks/decode_cpu.py` builds it) once per
variant, brings `batch` requests to their decode steps (`decode_step._ready`: no prefill), then
in rounds times each variant's engine steps in turn (CPU time of this thread, OMP_NUM_THREADS=1,
so a shared machine's waiting is not counted) and profiles a few steps of each. A step splits into:
  - LM head: everything inside the `lm_head` module (its kernel and the casts around it),
  - linear kernels: the other matmul kernels (the C++ ops, aten mm/addmm/mv, torch's int4/int8 ops),
  - attention: SDPA / the matmul decode path over the pages,
  - other: the rest of the unprofiled step time: Python, dispatch and small ops (norms, rotary,
    the KV store, sampling, the scheduler, detokenizing).
Each part is this thread's CPU time between hooks around it (no profiler: under a shared
machine the profiler's times are wall times, mostly waiting); "other" is the median unhooked step
minus the parts, so the hooks' own cost is not counted in it.

    python benchmarks/decode_profile.py --variants unmerged merged [--batches 1 8] [--context 128]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch
from decode_step import _drain, _ready  # type: ignore[import-not-found]

from anyquant import LLM
from anyquant.quant.kernels.base import LinearKernel

VARIANTS: dict[str, dict[str, Any]] = {
    "unmerged": {"merge_projections": False},
    "merged": {},
    "int8-head": {"lm_head_dtype": "int8"},
}


def _steps_cpu_ms(llm: LLM, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        c0 = time.thread_time()
        llm.engine.step()
        out.append((time.thread_time() - c0) * 1e3)
    return out


class _Clock:
    """Accumulates this thread's CPU time between enter and exit calls (nested calls once)."""

    def __init__(self) -> None:
        self.ms = 0.0
        self.calls = 0
        self._start = 0.0

    def enter(self, *_: Any) -> None:
        self._start = time.thread_time()

    def exit(self, *_: Any) -> None:
        self.ms += (time.thread_time() - self._start) * 1e3
        self.calls += 1


def _breakdown(llm: LLM, steps: int) -> dict[str, float]:
    """Per step: CPU ms in the LM head, in the other linear kernels and in paged attention, by
    hooks around them (a thread-CPU-clock read each side, no profiler); the kernel call count."""
    from anyquant.engine import kv_cache

    model = llm.loaded.model
    head, linear, attention = _Clock(), _Clock(), _Clock()
    hooks = []
    for module in model.modules():
        if isinstance(module, LinearKernel):
            clock = head if module is model.lm_head.kernel else linear
            hooks.append(module.register_forward_pre_hook(clock.enter))
            hooks.append(module.register_forward_hook(clock.exit))
    original = kv_cache.paged_attention

    def timed(*args: Any, **kwargs: Any) -> Any:
        attention.enter()
        try:
            return original(*args, **kwargs)
        finally:
            attention.exit()

    kv_cache.paged_attention = timed  # type: ignore[assignment]
    try:
        for _ in range(steps):
            llm.engine.step()
    finally:
        kv_cache.paged_attention = original  # type: ignore[assignment]
        for hook in hooks:
            hook.remove()
    return {
        "lm_head_ms": head.ms / steps,
        "linear_ms": linear.ms / steps,
        "attention_ms": attention.ms / steps,
        "linear_calls": linear.calls / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="out/bench/dense-w4a16")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--profile-steps", type=int, default=6, help="steps timed part by part")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    budget = args.rounds * args.steps + args.profile_steps + 8
    llms = {
        name: LLM(
            args.model,
            dtype="bfloat16",
            max_model_len=args.context + budget + 16,
            max_num_seqs=max(args.batches),
            enforce_eager=True,  # the hooks time kernel modules, which a compiled step does not call
            **VARIANTS[name],
        )
        for name in args.variants
    }
    vocab = int(next(iter(llms.values())).loaded.config["vocab_size"])
    rows = []
    for batch in args.batches:
        times: dict[str, list[float]] = {name: [] for name in llms}
        for llm in llms.values():
            _ready(llm, batch, args.context, vocab, max_tokens=budget)
            llm.engine.step()  # warm-up
        gc.collect()
        for _ in range(args.rounds):  # interleaved: every variant sees the same machine load
            for name, llm in llms.items():
                times[name] += _steps_cpu_ms(llm, args.steps)
        for name, llm in llms.items():
            step = statistics.median(times[name])
            prof = _breakdown(llm, args.profile_steps)
            _drain(llm)
            kernels = prof["lm_head_ms"] + prof["linear_ms"] + prof["attention_ms"]
            row = {"variant": name, "batch": batch, "step_ms": step, "tok_s": batch / step * 1e3, **prof}
            row["other_ms"] = max(step - kernels, 0.0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["batch"]: r for r in rows if r["variant"] == args.variants[0]}
    print(
        "\n| variant | batch | step ms (CPU) | tok/s | vs first | LM head ms | linear kernels ms "
        "| attention ms | other ms (share) | linear calls |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = base[r["batch"]]["step_ms"] / r["step_ms"]
        print(
            f"| {r['variant']} | {r['batch']} | {r['step_ms']:.1f} | {r['tok_s']:.1f} | {speed:.3f}x | "
            f"{r['lm_head_ms']:.1f} | {r['linear_ms']:.1f} | {r['attention_ms']:.1f} | "
            f"{r['other_ms']:.1f} ({r['other_ms'] / r['step_ms']:.0%}) | {r['linear_calls']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
