"""Kernel micro-benchmark: every CPU kernel that can run a spec, against dense F.linear, per shape.

For each quantization spec, layer shape and token count T it times the C++ kernel (cpu_avx512),
the pure-torch kernel (cpu_int4 / cpu_int8_weight / cpu_fp8_dequant / cpu_w8a8_int8) and a dense
F.linear of the same shape in the compute dtype, and prints one markdown row with µs, GB/s (bytes
the kernel keeps: packed codes + scales + zero points; 2 bytes per weight for dense bf16), GFLOP/s
and the error of each kernel against the reference kernel. The machine's read bandwidth is measured
in the same run (a sum over a 256 MiB tensor), so GB/s can be read as a fraction of it.

    python benchmarks/linear_kernels.py [--tokens 1,4,16,64,512] [--dtype bfloat16] [--threads N]

Every engine cycles through copies of its layer totalling more than the last-level cache, so a
one-token call streams its weights from memory as a real decode step does (one layer's weights
would otherwise stay in L2/L3 between calls). Weights are random codes with realistic scales.

(Not named kernels.py: a script's folder comes first on sys.path, and a `kernels` module there
would shadow the `kernels` package that transformers imports.)
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.registry import kernel_classes
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups

# (name, out_features N, in_features K): the linear layers of Qwen2.5-0.5B (hidden 896,
# intermediate 4864, 14 query / 2 KV heads of 64) and one Qwen3-30B-A3B expert (hidden 2048,
# expert intermediate 768).
LAYERS = (
    ("q/o_proj", 896, 896),
    ("k/v_proj", 128, 896),
    ("gate/up_proj", 4864, 896),
    ("down_proj", 896, 4864),
    ("expert gate/up", 768, 2048),
    ("expert down", 2048, 768),
)

SPECS = (
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True),
    QuantSpec("uint4", "group", group_size=32, has_zero=True),
    QuantSpec("int8", "channel"),
    QuantSpec("fp8_e4m3", "channel"),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", 128)),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
)
FAST, FALLBACKS = "cpu_avx512", ("cpu_int4", "cpu_int8_weight", "cpu_fp8_dequant", "cpu_w8a8_int8")
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
        data = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = scale / 100
    return QuantWeight(spec, (n, k), data, scale.float(), zero, group_index).validate("bench")


def time_us(fn: Callable[[], object], min_time: float) -> float:
    """Fastest call in µs over at least `min_time` seconds (and 3 calls), after a warm-up call.

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    fn()
    best = float("inf")
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time or calls < 3:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best * 1e6


def read_bandwidth_gbs(min_time: float) -> float:
    """GB/s of a vectorized sum over 256 MiB (read-only, all threads): the weights' ceiling."""
    big = torch.ones(64 << 20, dtype=torch.float32)
    us = time_us(lambda: big.sum(), max(min_time, 0.5))
    return big.numel() * 4 / us / 1e3


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


class DenseLinear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


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
    spec: QuantSpec, layer: tuple[str, int, int], tokens: list[int], dtype: torch.dtype
) -> list[Case]:
    name, n, k = layer
    gen = torch.Generator().manual_seed(n * 7919 + k)
    w = random_weight(spec, n, k, gen)
    reference = build("reference", w, dtype)
    assert reference is not None
    layers: dict[str, nn.Module] = {}
    for engine in (FAST, *FALLBACKS):
        kernel = build(engine, w, dtype)
        if kernel is not None:
            layers[engine] = kernel
    layers["dense"] = DenseLinear(torch.randn(n, k, generator=gen).mul(0.02).to(dtype))
    nbytes = {engine: held_bytes(layer) for engine, layer in layers.items()}
    rotations = {engine: Rotation(layer, nbytes[engine]) for engine, layer in layers.items()}
    cases = []
    for t in tokens:
        x = torch.randn(t, k, generator=gen).to(dtype)
        ref = reference(x)
        err = {e: rel_err(layer(x), ref) for e, layer in layers.items() if e != "dense"}
        engines = {e: (lambda r=r, x=x: r(x)) for e, r in rotations.items()}
        cases.append(Case(spec.describe(), f"{name} {n}x{k}", (n, k), t, engines, nbytes, err))
    return cases


def markdown(cases: list[Case], bandwidth: float) -> str:
    lines = [
        "| spec | layer | T | engine | µs | GB/s | % of read BW | GFLOP/s | vs dense | rel. err vs ref |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        n, k = c.shape
        dense_us = c.best_us["dense"]
        for engine, us in c.best_us.items():
            gbs = c.nbytes[engine] / us / 1e3
            gflops = 2 * c.tokens * n * k / us / 1e3
            err = f"{c.err[engine]:.1e}" if engine in c.err else "-"
            lines.append(
                f"| {c.spec} | {c.layer} | {c.tokens} | {engine} | {us:.0f} | {gbs:.1f} | "
                f"{100 * gbs / bandwidth:.0f} | {gflops:.0f} | {dense_us / us:.2f}x | {err} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4,16,64,512", help="comma-separated token counts")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="compute dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of timing per measurement")
    parser.add_argument("--passes", type=int, default=2, help="sweeps over all cases; the best time is kept")
    parser.add_argument("--specs", default="", help="comma-separated indices into SPECS (default: all)")
    parser.add_argument("--layers", default="", help="comma-separated indices into LAYERS (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    dtype = _DTYPES[args.dtype]
    specs = [SPECS[int(i)] for i in args.specs.split(",")] if args.specs else list(SPECS)
    layers = [LAYERS[int(i)] for i in args.layers.split(",")] if args.layers else list(LAYERS)
    cases: list[Case] = []
    with torch.inference_mode():
        bandwidth = read_bandwidth_gbs(args.min_time)
        for spec in specs:
            for layer in layers:
                # One (spec, shape) at a time: its rotated copies take ~100 MB per engine.
                group = make_cases(spec, layer, tokens, dtype)
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
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, best of {args.passes} sweeps; "
        f"read bandwidth (sum over 256 MiB) {bandwidth:.1f} GB/s\n"
    )
    print(markdown(cases, bandwidth))


if __name__ == "__main__":
    main()
