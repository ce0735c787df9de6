"""The LM head at decode: bf16 weights vs int8 weights on the C++ kernel (decoded to bf16 in
registers, vdpbf16ps) vs int8 weights with int8 activations (VNNI dot products through oneDNN's
`_int_mm`, per-token dynamic activation scales), interleaved in one process, and each one's
error against a float64 reference.

    OMP_NUM_THREADS=1 python benchmarks/lm_head_kernels.py [--vocab 151936] [--hidden 896] [--rows 1 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anyquant.errors import UnsupportedError
from anyquant.loading.lm_head import INT8_HEAD, quantize_rows
from anyquant.quant.registry import choose_kernel
from anyquant.quant.spec import ActQuant, QuantSpec

W8A8 = QuantSpec("int8", "channel", act=ActQuant("int8", dynamic=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.vocab, args.hidden)
    dense = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    cpu = torch.device("cpu")
    kernels = {}
    bf16 = choose_kernel(None, "lm_head", cpu, shape, torch.bfloat16).kernel(shape, torch.bfloat16)
    bf16.load(dense)
    kernels[f"bf16 ({bf16.name})"] = bf16
    q = quantize_rows(dense, INT8_HEAD)
    fma = choose_kernel(INT8_HEAD, "lm_head", cpu, shape, torch.bfloat16).kernel(shape, torch.bfloat16)
    fma.load(q)
    kernels[f"int8 weights, bf16 FMA ({fma.name})"] = fma
    try:
        vnni = choose_kernel(W8A8, "lm_head", cpu, shape, torch.bfloat16, prefer="cpu_w8a8_int8").kernel(
            shape, torch.bfloat16
        )
    except UnsupportedError as exc:  # no VNNI: the int8-activation column is left out, with why
        print(f"int8 activations left out: {exc}")
    else:
        vnni.load(q.with_spec(W8A8))
        kernels[f"int8 weights + int8 act, VNNI ({vnni.name})"] = vnni
    w64 = dense.double()
    print("| rows | kernel | ms per call | vs bf16 | weight GB/s | rel. L2 error vs float64 |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows in args.rows:
        x = torch.randn(rows, args.hidden, generator=g).to(torch.bfloat16)
        want = x.double() @ w64.T  # the exact product with the bf16 head's weights
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(args.rounds):  # interleaved
            for name, k in kernels.items():
                t0 = time.thread_time()
                k(x)
                times[name].append((time.thread_time() - t0) * 1e3)
        base = statistics.median(times[next(iter(kernels))])
        for name, k in kernels.items():
            ms = statistics.median(times[name])
            nbytes = sum(b.numel() * b.element_size() for b in k.buffers())
            nbytes += sum(p.numel() * p.element_size() for p in k.parameters())
            err = float((k(x).double() - want).norm() / want.norm())
            print(f"| {rows} | {name} | {ms:.2f} | {base / ms:.2f}x | {nbytes / ms / 1e6:.1f} | {err:.2e} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
