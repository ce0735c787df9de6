"""The engine's own cost of a decode step (host time outside the heavy kernels), eager and compiled.

Loads the Qwen2.5-0.5B-shaped W4A16 checkpoint (`benchmarks/decode_cpu.py` builds it) with its
decode step compiled, brings `batch` requests to their decode steps (`decode_step._ready`: no
prefill) and, in rounds, times engine steps eagerly (the runner's captured step switched off) and
compiled, in turn (CPU time of this thread, OMP_NUM_THREADS=1, medians). Then, once per batch and
mode:
  - the torch profiler splits a step into the heavy kernels (`decode_step.HEAVY_OPS`: matmuls,
    quantized matmuls, attention) and the rest; "host" = the median unprofiled step times the
    profiled steps' share outside the heavy kernels (wall clock, both): Python, dispatch and
    small ops, what issue 11 wants under 10 % of the step (the profiler's own per-op cost makes
    it an upper bound). The compiled step's "guards" row is Dynamo's cache lookup before the graph
    runs (the profiler's "TorchDynamo Cache Lookup" event);
  - `cProfile` names where the host time goes (cumulative time of the engine's own functions,
    inflated by the profiler's per-call cost, so read them as shares, not absolute figures);
  - the compiled step by component (`components`: cProfile on this thread's CPU clock): the
    engine around the runner, the runner, the captured step's own Python, Dynamo's entry, the
    C++ ops (linear and attention kernels), Python around each op call (torch.ops dispatch, and
    the pure-torch attention op's Python where it runs), the Inductor wrapper with its kernels.

    python benchmarks/decode_overhead.py [--batches 1 32] [--context 128] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import time

import torch
from decode_cpu import DENSE, build  # type: ignore[import-not-found]
from decode_profile import _steps_cpu_ms  # type: ignore[import-not-found]
from decode_step import HEAVY_OPS, _drain, _ready  # type: ignore[import-not-found]

from anyquant import LLM

GUARD_EVENT = "TorchDynamo Cache Lookup"
# Qwen2.5-0.5B's layers, heads and head width with every matrix shrunk (hidden 128, MLP 128,
# vocabulary 1024): the same ops, calls and metadata per step as the real model, with kernels
# that take next to nothing, so a step's time is the engine's own (`--shape overhead`).
OVERHEAD_SHAPE = {
    **DENSE,
    "hidden_size": 128,
    "intermediate_size": 128,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
}
# Engine functions whose cumulative time the cProfile listing reports (file suffix, function).
WATCHED = (
    ("engine/scheduler.py", "schedule"),
    ("engine/scheduler.py", "update"),
    ("engine/runner.py", "execute"),
    ("engine/capture.py", "run"),
    ("engine/capture.py", "_set_step"),
    ("layers/attention.py", "plan_paged_attention"),
    ("layers/attention.py", "paged_attention"),
    ("layers/attention.py", "forward"),
    ("engine/kv_cache.py", "attend"),
    ("engine/kv_cache.py", "write"),
    ("layers/custom_ops.py", "_paged_decode_attention"),
    ("layers/decode_kernel.py", "check_decode_step"),
    ("engine/engine.py", "_sample_step"),
    ("engine/engine.py", "_delta"),
)


def profiled_split(llm: LLM, steps: int) -> dict[str, float]:
    """Per step (profiled, wall clock): ms in the heavy kernels and the share of the step outside
    them, ms in Dynamo's guard check, aten ops. The share compares two wall times of the same
    steps, so a shared machine's waiting inflates both alike."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        wall = (time.perf_counter() - t0) * 1e3
    heavy = guards = attention = 0.0
    ops = 0
    for evt in prof.key_averages():
        if evt.key.startswith("aten::"):
            ops += evt.count
        if evt.key in HEAVY_OPS:
            heavy += evt.self_cpu_time_total / 1e3
        if evt.key.startswith("anyquant_cpu::paged_decode"):
            attention += evt.self_cpu_time_total / 1e3
        if evt.key == GUARD_EVENT:
            guards += evt.cpu_time_total / 1e3
    return {
        "heavy_ms": heavy / steps,
        "host_share": max(1 - heavy / wall, 0.0),
        "guard_ms": guards / steps,
        "attention_kernel_ms": attention / steps,
        "aten_ops": ops / steps,
    }


def python_profile(llm: LLM, steps: int) -> dict[str, float]:
    """Per step: cumulative ms (under cProfile) of the WATCHED engine functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        llm.engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {"(whole step)": 0.0}
    for (path, _, name), (_, _, _, cumulative, _) in stats.items():
        if name == "step" and path.endswith("engine/engine.py"):
            out["(whole step)"] = cumulative * 1e3 / steps
        for suffix, watched in WATCHED:
            if name == watched and path.endswith(suffix):
                key = f"{suffix.split('/')[-1]}:{name}"
                out[key] = out.get(key, 0.0) + cumulative * 1e3 / steps
    return out


def components(llm: LLM, steps: int) -> dict[str, float]:
    """Per step, ms of this thread's CPU time under cProfile (inflated by its per-call cost: read
    as shares) of the compiled step's components (module docstring). An op call from the graph
    is split by the callers of `OpOverload.__call__`: its own time is the Python dispatch, the
    rest the op (cProfile keeps no entry of its own for an op with a mutated argument, so the op
    is what `__call__` spends below itself); the pure-torch attention op's Python is its Python
    kernel less the C++ decode kernel it calls."""
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    for _ in range(steps):
        llm.engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def total(path_end: str, name: str) -> float:
        return sum(v[3] for (path, _, n), v in stats.items() if n == name and path.endswith(path_end))

    def op_calls(caller_path: str, caller_name: str) -> tuple[float, float]:
        """(own time, time below) of torch.ops calls made from the given function."""
        own = below = 0.0
        for (path, _, name), value in stats.items():
            if name != "__call__" or not path.endswith("torch/_ops.py"):
                continue
            for (c_path, _, c_name), (_, _, tt, ct) in value[4].items():
                if c_name == caller_name and caller_path in c_path:
                    own, below = own + tt, below + ct - tt
        return own, below

    step = total("engine/engine.py", "step")
    execute = total("engine/runner.py", "execute")
    run = total("engine/capture.py", "run")
    entry = total("torch/_dynamo/eval_frame.py", "compile_wrapper")
    wrapper = sum(v[3] for (path, _, n), v in stats.items() if n == "call" and "torchinductor" in path)
    dispatch, graph_ops = op_calls("torchinductor", "call")
    _, inner_kernel = op_calls("layers/decode_kernel.py", "paged_decode")
    attention_python = max(total("layers/custom_ops.py", "_paged_decode_attention") - inner_kernel, 0.0)
    rows = {
        "engine outside the runner": step - execute,
        "runner: step metadata (tables, slots)": execute - run,
        "capture.run: padding, inputs, per-step plan / check": run - entry,
        "Dynamo entry (cache lookup, guards, AOT wrappers)": entry - wrapper,
        "C++ ops: linear + attention kernels (and the fused K/V store)": graph_ops - attention_python,
        "torch.ops call Python (OpOverload.__call__)": dispatch,
        "attention op Python (pure-torch path: store, plan, checks)": attention_python,
        "Inductor wrapper and its fused kernels (rest of `call`)": wrapper - graph_ops - dispatch,
    }
    out = {k: v * 1e3 / steps for k, v in rows.items()}
    out["whole step under cProfile"] = step * 1e3 / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="out/bench/dense-w4a16")
    parser.add_argument(
        "--shape",
        choices=["model", "overhead"],
        default="model",
        help="overhead: --model is replaced by the shrunk Qwen2.5-0.5B (built once under out/bench/)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode per round")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--components", action="store_true", help="the compiled step's component table")
    args = parser.parse_args()
    if args.shape == "overhead":
        args.model = str(build("overhead", OVERHEAD_SHAPE))
    budget = len(args.modes) * (args.steps + 2 * args.profile_steps + 1) + 8
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        dtype="bfloat16",
        max_model_len=args.context + budget + 16,
        max_num_seqs=max(args.batches),
        enforce_eager="compiled" not in args.modes,
    )
    print(json.dumps({"load_s": time.perf_counter() - t0}), flush=True)
    runner = llm.engine.runner
    captured = runner.captured
    if "compiled" in args.modes and captured is None:
        raise SystemExit(f"no compiled step: {llm.eager_reason}")
    vocab = int(llm.loaded.config["vocab_size"])
    times: dict[tuple[int, str], list[float]] = {(b, m): [] for b in args.batches for m in args.modes}
    splits: dict[tuple[int, str], dict[str, float]] = {}
    for round_ in range(args.rounds):
        for batch in args.batches:
            _ready(llm, batch, args.context, vocab, max_tokens=budget)
            for mode in args.modes:
                runner.captured = captured if mode == "compiled" else None
                if round_ == 0:
                    llm.engine.step()  # untimed
                gc.collect()
                times[(batch, mode)] += _steps_cpu_ms(llm, args.steps)
            if round_ == 0:
                for mode in args.modes:
                    runner.captured = captured if mode == "compiled" else None
                    split = profiled_split(llm, args.profile_steps)
                    split.update(python_profile(llm, args.profile_steps))
                    if args.components and mode == "compiled":
                        split.update({f"component {k}": v for k, v in components(llm, 10).items()})
                    splits[(batch, mode)] = split
            runner.captured = captured
            _drain(llm)
    rows = []
    for batch in args.batches:
        for mode in args.modes:
            step = statistics.median(times[(batch, mode)])
            split = splits[(batch, mode)]
            host = step * split["host_share"]
            row = {"batch": batch, "mode": mode, "step_ms": step, "host_ms": host, **split}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| batch | mode | step ms | heavy kernels ms (profiled) | host ms (share) | guards ms | aten ops/step |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['mode']} | {r['step_ms']:.2f} | {r['heavy_ms']:.2f} | "
            f"{r['host_ms']:.2f} ({r['host_ms'] / r['step_ms']:.0%}) | {r['guard_ms']:.2f} | "
            f"{r['aten_ops']:.0f} |"
        )
    names = sorted(
        {k for r in rows for k in r if (":" in k and not k.startswith("component")) or k == "(whole step)"}
    )
    print("\ncProfile, cumulative ms per step (inflated by the profiler; compare within a column)")
    print("| function | " + " | ".join(f"b{r['batch']} {r['mode']}" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r.get(name, 0.0):.2f}" for r in rows) + " |")
    compiled_rows = [r for r in rows if any(k.startswith("component ") for k in r)]
    if compiled_rows:
        print("\nThe compiled step by component: ms per step under cProfile, CPU time (share)")
        print("| component | " + " | ".join(f"b{r['batch']}" for r in compiled_rows) + " |")
        print("|---|" + "---:|" * len(compiled_rows))
        for key in [k for k in compiled_rows[0] if k.startswith("component ")]:
            whole = "component whole step under cProfile"
            print(
                f"| {key[len('component ') :]} | "
                + " | ".join(f"{r[key]:.2f} ({r[key] / r[whole]:.0%})" for r in compiled_rows)
                + " |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
