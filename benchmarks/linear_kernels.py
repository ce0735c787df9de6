"""Kernel micro-benchmark on the linear layers of a Qwen2.5-0.5B-shaped decoder layer.

For each quantization spec the best registered CPU kernel (what `choose_kernel` picks) is timed
against the reference kernel and against dense bfloat16 / float32 `F.linear`, at a few token
counts, and its output is compared with the reference's. Prints a markdown table:

    python benchmarks/linear_kernels.py [--tokens 1,64] [--dtypes bfloat16,float32] [--threads N]

Weights are random codes with realistic scales (this measures speed and kernel error, not
quantization quality). GB/s is the weight bytes the kernel keeps (packed codes + scales) per call.

(Not named kernels.py: a script's folder comes first on sys.path, and a `kernels` module there
would shadow the `kernels` package that transformers imports.)
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.registry import choose_kernel, kernel_classes
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups

# (name, out_features N, in_features K) for Qwen2.5-0.5B: hidden 896, intermediate 4864,
# 14 query heads and 2 KV heads of 64; the vocabulary head is skipped.
LAYERS = (
    ("q_proj", 896, 896),
    ("k_proj", 128, 896),
    ("v_proj", 128, 896),
    ("o_proj", 896, 896),
    ("gate_proj", 4864, 896),
    ("up_proj", 4864, 896),
    ("down_proj", 896, 4864),
)

SPECS = (
    QuantSpec("uint4", "group", group_size=128),
    QuantSpec("uint4", "group", group_size=128, has_zero=True, act_order=True),
    QuantSpec("int8", "channel"),
    QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True)),
    QuantSpec("fp8_e4m3", "channel", act=ActQuant("fp8_e4m3", dynamic=True)),
    QuantSpec("fp8_e4m3", "block", block_shape=(128, 128), act=ActQuant("fp8_e4m3", True, "group", 128)),
)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


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


def time_us(fn: Callable[[], Tensor], min_time: float) -> float:
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


def rel_err(y: Tensor, ref: Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


@dataclass
class Case:
    """One (spec, layer shape, T, dtype) measurement: built kernels, inputs and best times so far."""

    kernel: str
    spec: str
    layer: str
    shape: tuple[int, int]
    tokens: int
    dtype: str
    weight_bytes: int
    err: float
    calls: dict[str, Callable[[], Tensor]]
    best_us: dict[str, float] = field(default_factory=dict)

    def measure(self, min_time: float) -> None:
        for what, fn in self.calls.items():
            us = time_us(fn, min_time)
            self.best_us[what] = min(us, self.best_us.get(what, us))


def build(cls: type[LinearKernel], w: QuantWeight, dtype: torch.dtype) -> LinearKernel:
    kernel = cls(w.shape, dtype)
    kernel.load(w)
    return kernel


def make_case(spec: QuantSpec, layer: tuple[str, int, int], tokens: int, dtype: torch.dtype) -> Case:
    name, n, k = layer
    gen = torch.Generator().manual_seed(n * 7919 + k)
    w = random_weight(spec, n, k, gen)
    choice = choose_kernel(spec, "linear", torch.device("cpu"), (n, k), dtype)
    reference_cls = next(c for c in kernel_classes() if c.name == "reference")
    fast, ref = build(choice.kernel, w, dtype), build(reference_cls, w, dtype)
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    dense = torch.randn(n, k, generator=gen) * 0.02
    dense_bf16, dense_fp32 = dense.bfloat16(), dense.float()
    x_bf16, x_fp32 = x.bfloat16(), x.float()
    return Case(
        kernel=choice.name,
        spec=spec.describe(),
        layer=f"{name} {n}x{k}",
        shape=(n, k),
        tokens=tokens,
        dtype=str(dtype).removeprefix("torch."),
        weight_bytes=w.nbytes(),
        err=rel_err(fast(x), ref(x)),
        calls={
            "kernel": lambda: fast(x),
            "reference": lambda: ref(x),
            "dense_bf16": lambda: F.linear(x_bf16, dense_bf16),
            "dense_fp32": lambda: F.linear(x_fp32, dense_fp32),
        },
    )


def markdown(cases: list[Case]) -> str:
    head = (
        "| kernel | spec | layer | T | dtype | kernel µs | kernel GB/s | reference µs | speed-up "
        "| dense bf16 µs | dense fp32 µs | rel. err vs ref |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for c in cases:
        t = c.best_us
        gbs = c.weight_bytes / (t["kernel"] * 1e-6) / 1e9
        lines.append(
            f"| {c.kernel} | {c.spec} | {c.layer} | {c.tokens} | {c.dtype} | {t['kernel']:.0f} | {gbs:.2f} "
            f"| {t['reference']:.0f} | {t['reference'] / t['kernel']:.1f}x | {t['dense_bf16']:.0f} "
            f"| {t['dense_fp32']:.0f} | {c.err:.1e} |"
        )
    return "\n".join(lines)


def per_decoder_layer(cases: list[Case]) -> str:
    """µs for the 7 projections of one decoder layer (q/o and gate/up share a measured shape)."""
    uses = Counter((n, k) for _, n, k in LAYERS)
    totals: dict[tuple[str, str, int, str], Counter[str]] = {}
    for c in cases:
        total = totals.setdefault((c.kernel, c.spec, c.tokens, c.dtype), Counter())
        for what, us in c.best_us.items():
            total[what] += uses[c.shape] * us
    lines = [
        "| kernel | spec | T | dtype | kernel µs | reference µs | speed-up | dense bf16 µs | dense fp32 µs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, spec, tokens, dtype), t in totals.items():
        lines.append(
            f"| {kernel} | {spec} | {tokens} | {dtype} | {t['kernel']:.0f} | {t['reference']:.0f} "
            f"| {t['reference'] / t['kernel']:.1f}x | {t['dense_bf16']:.0f} | {t['dense_fp32']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,64", help="comma-separated token counts")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated compute dtypes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of timing per measurement")
    parser.add_argument("--passes", type=int, default=3, help="sweeps over all cases; the best time is kept")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    dtypes = [_DTYPES[d] for d in args.dtypes.split(",")]
    # q/o and gate/up have the same shapes; each distinct shape is measured once.
    shapes = list({(n, k): (name, n, k) for name, n, k in reversed(LAYERS)}.values())[::-1]
    with torch.inference_mode():
        cases = [
            make_case(spec, layer, t, dtype)
            for spec in SPECS
            for dtype in dtypes
            for t in tokens
            for layer in shapes
        ]
        # Several sweeps, keeping each cell's best: on a shared machine a busy spell then only
        # spoils the sweeps it overlaps, not a whole row.
        for _ in range(args.passes):
            for case in cases:
                case.measure(args.min_time)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, best of {args.passes} sweeps\n"
    )
    print("Per decoder layer (7 projections; q/o and gate/up timed once per shape):\n")
    print(per_decoder_layer(cases))
    print("\nPer projection shape:\n")
    print(markdown(cases))


if __name__ == "__main__":
    main()
