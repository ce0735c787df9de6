"""Kernel micro-benchmark: every CPU kernel that can run a spec, against dense F.linear, per shape.

For each quantization spec, layer shape and token count T it times the C++ kernels (cpu_avx512,
cpu_avx2 (AVX2 + FMA CPUs);
cpu_avx512_vnni and cpu_avx2_a8 (AVX2 CPUs), for weight-only specs as "(A8)": the same weights with
per-token int8 activations, what `--activation-dtype int8` runs), the pure-torch kernel (cpu_int4 / cpu_int8_weight /
cpu_fp8_dequant / cpu_w8a8_int8), a dense F.linear of the same shape in the compute dtype, and
"read": the extension's plain 64-byte-load streaming read over buffers of the quantized kernel's
size, timed by the same protocol, which is the bandwidth roofline each row's "% of read" uses. It
prints one markdown row per engine with µs, GB/s (bytes the kernel keeps: packed codes + scales +
zero points; 2 bytes per weight for dense bf16), GFLOP/s, speed against dense, and the error
against the reference kernel of the spec as stored (for "(A8)" rows that includes the activations'
quantization). `--csv` writes throughput against T per engine; `--plot` a PNG of it (needs
matplotlib, which is not a dependency: without it the plot is skipped with a note).

    python benchmarks/linear_kernels.py [--tokens 1,2,3,4,16,64,512] [--dtype bfloat16] [--threads N]

Every engine cycles through copies of its layer totalling more than the last-level cache, so a
one-token call streams its weights from memory as a real decode step does (one layer's weights
would otherwise stay in L2/L3 between calls). Weights are random codes with realistic scales.

(Not named kernels.py: a script's folder comes first on sys.path, and a `kernels` module there
would shadow the `kernels` package that transformers imports.)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.avx2 import INT4_ROW_FP32_ENV
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.registry import kernel_classes
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups

# (name, out_features N, in_features K) as the engine runs them (q/k/v and gate/up merged):
# Qwen2.5-0.5B (hidden 896, intermediate 4864, 14 query / 2 KV heads of 64, vocabulary 151936),
# Llama-3.2-1B (hidden 2048, intermediate 8192, 32 / 8 heads of 64) and one Qwen3-30B-A3B expert
# (hidden 2048, expert intermediate 768). The LM head runs only for int8 per-channel specs (the
# `--lm-head-dtype int8` head), unless --layers names it.
LAYERS = (
    ("qwen0.5b qkv", 1152, 896),
    ("qwen0.5b o", 896, 896),
    ("qwen0.5b gate/up", 9728, 896),
    ("qwen0.5b down", 896, 4864),
    ("llama1b qkv", 3072, 2048),
    ("llama1b gate/up", 16384, 2048),
    ("llama1b down", 2048, 8192),
    ("a3b expert gate/up", 1536, 2048),
    ("a3b expert down", 2048, 768),
    ("qwen0.5b lm_head", 151936, 896),
)
_HEAD = len(LAYERS) - 1
# `--gemv-shapes`: every projection on its own (unmerged), the decode GEMV shapes of the kernels
# issue: Qwen2.5-0.5B q/o, k/v, gate or up, down; the same for Llama-3.2-1B; a Qwen3-30B-A3B expert;
# the Qwen3-30B-A3B-shaped int4 LM head (`lm_head_dtype="int4"`, 167 MiB at uint4 g128).
GEMV_SHAPES = (
    ("qwen0.5b q/o", 896, 896),
    ("qwen0.5b k/v", 128, 896),
    ("qwen0.5b gate, up", 4864, 896),
    ("qwen0.5b down", 896, 4864),
    ("llama1b q/o", 2048, 2048),
    ("llama1b k/v", 512, 2048),
    ("llama1b gate, up", 8192, 2048),
    ("llama1b down", 2048, 8192),
    ("a3b expert gate, up", 768, 2048),
    ("a3b expert down", 2048, 768),
    ("a3b int4 lm_head", 151936, 2048),
)

SPECS = (
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=32),
    QuantSpec("uint4", "group", group_size=64, has_zero=True),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True),
    QuantSpec("uint4", "group", group_size=32, has_zero=True),
    QuantSpec("int8", "channel"),
    QuantSpec("fp8_e4m3", "channel"),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", 128)),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
    QuantSpec("fp8_e5m2", "channel"),
    QuantSpec("uint4", "group", group_size=128, has_zero=True),  # the int4 LM head's (`lm_head_dtype="int4"`)
)
# The C++ kernels: cpu_avx512 where the CPU has AVX512_BF16, cpu_avx2 on any AVX2 + FMA CPU (both
# are timed where both run); an engine the CPU cannot run is left out of the table.
FAST, AVX2 = "cpu_avx512", "cpu_avx2"
FALLBACKS = ("cpu_int4", "cpu_int8_weight", "cpu_fp8_dequant", "cpu_w8a8_int8")
VNNI, A8 = "cpu_avx512_vnni", "cpu_avx512_vnni (A8)"
# The int8-activation kernel of AVX2 CPUs, and its "(A8)" engine as A8 is VNNI's.
AVX2_A8, AVX2_A8_FORCED = "cpu_avx2_a8", "cpu_avx2_a8 (A8)"
INT8_ACT_ENGINES = {A8: VNNI, AVX2_A8_FORCED: AVX2_A8}
# cpu_avx512 held to its vector path at every row count (the many-rows path before the GEMM):
# an A/B of the GEMM in the same run. Timed only when --engines names it.
VECTOR = "cpu_avx512 (vector)"
# cpu_avx2 held to one path at every row count ("gemv" runs bf16 compute only): A/Bs of the paths
# in the same run, for the row thresholds in avx2.py. Timed only when --engines names them.
AVX2_FORCED = {
    "cpu_avx2 (vector)": "gemv",
    "cpu_avx2 (few rows)": "fewrows",
    "cpu_avx2 (rows)": "rows",
    "cpu_avx2 (tile)": "tiled",
}
# cpu_avx2 with one row of int4 on the fp32 kernel (INT4_ROW_FP32_ENV set for the call): the A/B
# of the 16-bit fixed-point one-row kernel in the same run. Timed only when --engines names it.
AVX2_FP32_ROW = "cpu_avx2 (fp32 row)"
# A dense fp32 F.linear of the same shape (x widened to fp32 and the result rounded back to the
# compute dtype inside the call: oneDNN's fp32 GEMM, what fp32 weights would cost on a CPU without
# native bf16), the yardstick of the rows kernel on long prompts. Timed only when --engines names it.
DENSE_FP32 = "dense fp32"
INT8_TOKEN = ActQuant("int8", dynamic=True)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_ROTATE_BYTES = 96 << 20  # 3x the 32 MiB last-level cache of the CPU measured


def random_weight(spec: QuantSpec, n: int, k: int, gen: torch.Generator) -> QuantWeight:
    """Random codes and plausible scales (weights of magnitude ~0.02) for `spec`."""
    if spec.granularity == "group":
        scale_shape: tuple[int, ...] = (n, num_groups(k, spec.group_size))
    elif spec.granularity == "block":
        bn, bk = spec.block_shape
        scale_shape = (-(-n // bn), -(-k // bk))
    else:
        scale_shape = (n,)
    scale = 0.002 + 0.002 * torch.rand(scale_shape, generator=gen)
    zero = group_index = None
    if spec.is_uint:
        top = 1 << spec.bits
        data = torch.randint(0, top, (n, k), generator=gen, dtype=torch.uint8)
        if spec.has_zero:
            zero = torch.randint(0, top, scale_shape, generator=gen, dtype=torch.int32)
        if spec.act_order:
            cols = torch.arange(k) // spec.group_size
            group_index = cols[torch.randperm(k, generator=gen)].to(torch.int32)
    elif spec.weight == "int8":
        data = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        fp8 = torch.float8_e4m3fn if spec.weight == "fp8_e4m3" else torch.float8_e5m2
        data = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(fp8)
        scale = scale / 100
    return QuantWeight(spec, (n, k), data, scale.float(), zero, group_index).validate("bench")


# What time_us reads: wall time, or with `--cpu-time` (one thread) the calling thread's CPU time,
# which a process preempted on a shared machine does not accumulate (cache evictions by other
# processes still count).
_CLOCK: list[Callable[[], float]] = [time.perf_counter]


def time_us(fn: Callable[[], object], min_time: float) -> float:
    """Fastest call in µs over at least `min_time` seconds (and 3 calls), after a warm-up call.

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    clock = _CLOCK[0]
    fn()
    best = float("inf")
    calls, start = 0, clock()
    while clock() - start < min_time or calls < 3:
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
        calls += 1
    return best * 1e6


def read_bandwidth_gbs(min_time: float) -> float:
    """GB/s of the extension's streaming read over 256 MiB (torch's threads)."""
    big = torch.ones(256 << 20, dtype=torch.uint8)
    us = time_us(lambda: cpu_ext.ops().read_bytes(big), max(min_time, 0.5))
    return big.numel() / us / 1e3


class ReadBytes(nn.Module):
    """Reads `nbytes` with 64-byte loads and nothing else: the bandwidth a kernel's bytes allow."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.register_buffer("data", torch.ones(max(256, nbytes // 256 * 256), dtype=torch.uint8))

    def forward(self, x: Tensor) -> int:
        return int(cpu_ext.ops().read_bytes(self.data))


def rel_err(y: Tensor, ref: Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def held_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers()) + sum(
        p.numel() * p.element_size() for p in module.parameters()
    )


class Rotation:
    """Copies of one layer totalling more than the cache; each call uses the next copy."""

    def __init__(self, layer: nn.Module, nbytes: int) -> None:
        count = max(1, _ROTATE_BYTES // max(nbytes, 1))
        self.layers = [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]
        self.i = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.i = (self.i + 1) % len(self.layers)
        return self.layers[self.i](x)


class Fp32Row(nn.Module):
    """A cpu_avx2 kernel called with INT4_ROW_FP32_ENV set: one row of int4 on the fp32 kernel."""

    def __init__(self, kernel: nn.Module) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        os.environ[INT4_ROW_FP32_ENV] = "1"
        try:
            return self.kernel(x)
        finally:
            del os.environ[INT4_ROW_FP32_ENV]


class DenseLinear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


@dataclass
class Case:
    spec: str
    layer: str
    shape: tuple[int, int]
    tokens: int
    engines: dict[str, Callable[[], Tensor]]
    nbytes: dict[str, int]
    err: dict[str, float]
    best_us: dict[str, float] = field(default_factory=dict)

    def measure(self, min_time: float) -> None:
        for what, fn in self.engines.items():
            us = time_us(fn, min_time)
            self.best_us[what] = min(us, self.best_us.get(what, us))


def kernel_named(name: str) -> type[LinearKernel]:
    return next(cls for cls in kernel_classes() if cls.name == name)


def build(name: str, w: QuantWeight, dtype: torch.dtype) -> LinearKernel | None:
    cls = kernel_named(name)
    if cls.cannot_run(w.spec, "linear", torch.device("cpu"), w.shape, dtype) is not None:
        return None
    kernel = cls(w.shape, dtype)
    kernel.load(w)
    return kernel


def make_cases(
    spec: QuantSpec,
    layer: tuple[str, int, int],
    tokens: list[int],
    dtype: torch.dtype,
    engines: tuple[str, ...] = (FAST, AVX2, VNNI, AVX2_A8, *FALLBACKS, A8, AVX2_A8_FORCED),
) -> list[Case]:
    name, n, k = layer
    gen = torch.Generator().manual_seed(n * 7919 + k)
    w = random_weight(spec, n, k, gen)
    reference = build("reference", w, dtype)
    assert reference is not None
    layers: dict[str, nn.Module] = {}
    for engine in (FAST, AVX2, VNNI, AVX2_A8, *FALLBACKS):
        if engine not in engines:
            continue
        kernel = build(engine, w, dtype)
        if kernel is not None:
            layers[engine] = kernel
    if VECTOR in engines:
        kernel = build(FAST, w, dtype)
        if kernel is not None:
            kernel.path = lambda rows: "gemv"  # type: ignore[method-assign]
            layers[VECTOR] = kernel
    for forced, path in AVX2_FORCED.items():
        kernel = build(AVX2, w, dtype) if forced in engines else None
        if kernel is not None:
            kernel.path = lambda rows, path=path: path  # type: ignore[method-assign]
            layers[forced] = kernel
    kernel = build(AVX2, w, dtype) if AVX2_FP32_ROW in engines else None
    if kernel is not None:
        layers[AVX2_FP32_ROW] = Fp32Row(kernel)
    for label, engine in INT8_ACT_ENGINES.items():
        if label in engines and spec.act is None and (spec.is_uint or spec.weight == "int8"):
            kernel = build(engine, w.with_spec(dataclasses.replace(spec, act=INT8_TOKEN)), dtype)
            if kernel is not None:
                layers[label] = kernel
    layers["dense"] = DenseLinear(torch.randn(n, k, generator=gen).mul(0.02).to(dtype))
    if DENSE_FP32 in engines:
        layers[DENSE_FP32] = DenseLinear(torch.randn(n, k, generator=gen).mul(0.02))
    nbytes = {engine: held_bytes(layer) for engine, layer in layers.items()}
    quantized = next(e for e in nbytes if e != "dense")
    layers["read"] = ReadBytes(nbytes[quantized])
    nbytes["read"] = held_bytes(layers["read"])
    rotations = {engine: Rotation(layer, nbytes[engine]) for engine, layer in layers.items()}
    cases = []
    for t in tokens:
        x = torch.randn(t, k, generator=gen).to(dtype)
        ref = reference(x)
        err = {
            e: rel_err(layer(x), ref) for e, layer in layers.items() if e not in ("dense", DENSE_FP32, "read")
        }
        engines = {e: (lambda r=r, x=x: r(x)) for e, r in rotations.items()}
        cases.append(Case(spec.describe(), f"{name} {n}x{k}", (n, k), t, engines, nbytes, err))
    return cases


HEADS = ("cpu_avx512_lm_head", "cpu_avx2_lm_head")


def on_path(kernel: nn.Module, path: str, x: Tensor) -> Tensor:
    """`kernel` on x with its path forced to `path` for this call."""
    kernel.path = lambda rows: path  # type: ignore[method-assign]
    try:
        return kernel(x)
    finally:
        del kernel.path


def make_head_cases(tokens: list[int]) -> list[Case]:
    """The unquantized bf16 LM head (Qwen2.5-0.5B's 151936 x 896): the C++ head kernels that run
    here against dense F.linear and the read of its bf16 bytes; errors against float64."""
    name, n, k = LAYERS[_HEAD]
    gen = torch.Generator().manual_seed(n)
    weight = torch.randn(n, k, generator=gen).mul(0.02).to(torch.bfloat16)
    layers: dict[str, nn.Module] = {}
    for engine in HEADS:
        cls = kernel_named(engine)
        if cls.cannot_run(None, "lm_head", torch.device("cpu"), (n, k), torch.bfloat16) is None:
            kernel = cls((n, k), torch.bfloat16)
            kernel.load(weight)
            layers[engine] = kernel
    layers["dense"] = DenseLinear(weight)
    nbytes = {engine: held_bytes(layer) for engine, layer in layers.items()}
    layers["read"] = ReadBytes(nbytes["dense"])
    nbytes["read"] = held_bytes(layers["read"])
    # The AVX2 head held to one path at every row count (the same kernel, no second copy).
    forced = {f"{HEADS[1]} ({label})": path for label, path in (("vector", "gemv"), ("few rows", "fewrows"))}
    if HEADS[1] in layers:
        nbytes.update({engine: nbytes[HEADS[1]] for engine in forced})
    cases = []
    for t in tokens:
        x = torch.randn(t, k, generator=gen).to(torch.bfloat16)
        truth = x.double() @ weight.double().T
        err = {e: rel_err(layer(x), truth) for e, layer in layers.items() if e != "read"}
        engines = {e: (lambda layer=layer, x=x: layer(x)) for e, layer in layers.items()}
        if HEADS[1] in layers:
            for engine, path in forced.items():
                engines[engine] = lambda x=x, path=path: on_path(layers[HEADS[1]], path, x)
                err[engine] = rel_err(engines[engine](), truth)
        cases.append(Case("bf16 (unquantized)", f"{name} {n}x{k}", (n, k), t, engines, nbytes, err))
    return cases


def markdown(cases: list[Case]) -> str:
    lines = [
        "| spec | layer | T | engine | µs | GB/s | % of read | GFLOP/s | vs dense | rel. err vs ref |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        n, k = c.shape
        dense_us = c.best_us["dense"]
        read_gbs = c.nbytes["read"] / c.best_us["read"] / 1e3
        for engine, us in c.best_us.items():
            if engine == "read" and c.tokens > 1:
                continue
            gbs = c.nbytes[engine] / us / 1e3
            gflops = 2 * c.tokens * n * k / us / 1e3 if engine != "read" else 0
            err = f"{c.err[engine]:.1e}" if engine in c.err else "-"
            lines.append(
                f"| {c.spec} | {c.layer} | {c.tokens} | {engine} | {us:.0f} | {gbs:.1f} | "
                f"{100 * gbs / read_gbs:.0f} | {gflops:.0f} | {dense_us / us:.2f}x | {err} |"
            )
    return "\n".join(lines)


def write_csv(cases: list[Case], path: Path) -> None:
    rows = ["spec,layer,tokens,engine,us,gbs,gflops"]
    for c in cases:
        n, k = c.shape
        for engine, us in c.best_us.items():
            gflops = 2 * c.tokens * n * k / us / 1e3
            rows.append(
                f"{c.spec},{c.layer},{c.tokens},{engine},{us:.1f},{c.nbytes[engine] / us / 1e3:.2f},{gflops:.1f}"
            )
    path.write_text("\n".join(rows) + "\n")


def plot(cases: list[Case], path: Path) -> str:
    """GFLOP/s against T, one panel per (spec, layer), one line per engine; or why not."""
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        return "matplotlib is not installed: no plot (the CSV has the same numbers)"
    panels: dict[tuple[str, str], list[Case]] = {}
    for c in cases:
        panels.setdefault((c.spec, c.layer), []).append(c)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), squeeze=False)
    for ax, ((spec, layer), group) in zip(axes[:, 0], panels.items()):
        for engine in group[0].best_us:
            if engine == "read":
                continue
            ts = [c.tokens for c in group]
            ax.plot(
                ts,
                [2 * c.tokens * c.shape[0] * c.shape[1] / c.best_us[engine] / 1e3 for c in group],
                "o-",
                label=engine,
            )
        ax.set(xscale="log", yscale="log", xlabel="rows of x (T)", ylabel="GFLOP/s", title=f"{spec}, {layer}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return f"plot written to {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,2,3,4,16,64,512", help="comma-separated token counts")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="compute dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of timing per measurement")
    parser.add_argument("--passes", type=int, default=2, help="sweeps over all cases; the best time is kept")
    parser.add_argument("--specs", default="", help="comma-separated indices into SPECS (default: all)")
    parser.add_argument("--layers", default="", help="comma-separated indices into LAYERS (default: all)")
    parser.add_argument(
        "--gemv-shapes",
        action="store_true",
        help="the unmerged decode shapes (GEMV_SHAPES) instead of LAYERS",
    )
    parser.add_argument(
        "--engines", default="", help=f"comma-separated quantized engines to time (default: all; e.g. {FAST})"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the thread's CPU time, not wall time (needs --threads 1; for a shared machine)",
    )
    parser.add_argument(
        "--lm-head",
        action="store_true",
        help="time only the unquantized bf16 LM head (the C++ head kernels against F.linear; errors vs float64)",
    )
    parser.add_argument("--csv", type=Path, default=None, help="write throughput against T here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of GFLOP/s against T here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-time measures the calling thread only: give --threads 1")
        _CLOCK[0] = time.thread_time
    tokens = [int(t) for t in args.tokens.split(",")]
    dtype = _DTYPES[args.dtype]
    specs = [SPECS[int(i)] for i in args.specs.split(",")] if args.specs else list(SPECS)
    chosen = [int(i) for i in args.layers.split(",")] if args.layers else None
    layers = GEMV_SHAPES if args.gemv_shapes else LAYERS
    engines = (
        tuple(args.engines.split(","))
        if args.engines
        else (FAST, AVX2, VNNI, AVX2_A8, *FALLBACKS, A8, AVX2_A8_FORCED)
    )
    cases: list[Case] = []
    with torch.inference_mode():
        bandwidth = read_bandwidth_gbs(args.min_time)
        if args.lm_head:  # the head is larger than the cache on its own: no rotation needed
            cases = make_head_cases(tokens)
            for _ in range(args.passes):
                for case in cases:
                    case.measure(args.min_time)
            specs = []
        for spec in specs:
            for index, layer in enumerate(layers):
                head_spec = spec.weight == "int8" and spec.granularity == "channel"
                if (chosen is not None and index not in chosen) or (
                    chosen is None and layers is LAYERS and index == _HEAD and not head_spec
                ):
                    continue
                # One (spec, shape) at a time: its rotated copies take ~100 MB per engine.
                group = make_cases(spec, layer, tokens, dtype, engines)
                # Several sweeps, keeping each cell's best: on a shared machine a busy spell then
                # only spoils the sweeps it overlaps, not a whole row.
                for _ in range(args.passes):
                    for case in group:
                        case.measure(args.min_time)
                for case in group:
                    case.engines.clear()
                cases.extend(group)
        bandwidth = max(bandwidth, read_bandwidth_gbs(args.min_time))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, best of {args.passes} sweeps"
        f"{' (thread CPU time)' if args.cpu_time else ''}; "
        f"streaming read over 256 MiB {bandwidth:.1f} GB/s; '% of read' is against the 'read' row "
        "of the same case (the same bytes, the same timing)\n"
    )
    print(markdown(cases))
    if args.csv:
        write_csv(cases, args.csv)
    if args.plot:
        print(plot(cases, args.plot))


if __name__ == "__main__":
    main()
