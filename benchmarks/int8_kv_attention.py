"""Decode attention on an int8 KV cache vs a bf16 one: the C++ kernel on each, alternating.

`anyquant_cpu::paged_decode_attention` (layers/decode_kernel.py) on Qwen2.5-0.5B's heads (14 query
heads, 2 KV heads, head dim 64), pages of 16 scattered over the cache, bf16 queries. A decode step
reads every layer's cache once, so each candidate has a cache per layer for `--layers` layers (24:
a whole step, more than the L3 holds at long contexts) and a timed sweep calls them in turn: each
call reads its K/V from memory, as in a step, not from the caches the previous call warmed. The
int8 caches hold the bf16 caches' rows quantized (layers/kv_quant.py: codes and a float32 scale
per row, `kv_quant.quantize_rows`).

Per (context, batch, threads), rounds alternate a bf16 sweep and an int8 sweep; the figure is the
median over the rounds of the time per call (1 thread: the thread's CPU time; more: wall time),
and the K/V bytes one call reads divided by that time, next to what the memory gives: the
extension's streaming read (`read_bytes`, 64-byte loads and nothing else) over 256 MiB at each
thread count, measured at the start. `--layers 1` keeps one layer's caches in the caches instead:
a kernel whose time does not change with it is bound by its arithmetic, not by memory. Before
timing, the int8 kernel's output is checked against the same kernel on the dequantized rows (fp32
caches).

    python benchmarks/int8_kv_attention.py [--contexts 128 1024 4096] [--batches 1 8]
        [--threads 1 2] [--layers 24] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anyquant.layers import kv_quant
from anyquant.layers.decode_kernel import describe_decode_attention
from anyquant.quant.kernels import cpu_ext

H, HKV, D, PAGE = 14, 2, 64, 16


def _caches(context: int, batch: int, layers: int) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """Per layer (bf16 K, bf16 V, int8 K, int8 V) of random rows, and the block tables [batch, P]:
    each sequence's pages for `context` keys, shuffled over the cache (as a long-running server's
    are) and shared by the layers (as the engine's are)."""
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq + 1
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(num_pages, generator=g)
    tables = order[: batch * pages_per_seq].view(batch, pages_per_seq).contiguous()
    per_layer = []
    for _ in range(layers):
        k, v = (torch.randn(HKV, num_pages * PAGE, D, generator=g).bfloat16() for _ in range(2))
        per_layer.append((k, v, kv_quant.quantize_rows(k), kv_quant.quantize_rows(v)))
    return per_layer, tables


def _sweep(ops, q, caches, tables, lens, int8: bool) -> float:
    """Seconds per call of one call per layer (CPU time of this thread at 1 thread, else wall)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    for k, v, k8, v8 in caches:
        ops.paged_decode_attention(q, k8 if int8 else k, v8 if int8 else v, tables, lens, PAGE, D**-0.5)
    return (clock() - t0) / len(caches)


def _read_gbs(ops, threads: int, rounds: int) -> float:
    """GB/s of the streaming read over 256 MiB at `threads` threads (median of `rounds`, wall)."""
    torch.set_num_threads(threads)
    big = torch.ones(256 << 20, dtype=torch.uint8)
    ops.read_bytes(big)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ops.read_bytes(big)
        times.append(time.perf_counter() - t0)
    return big.numel() / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    for dtype in (torch.bfloat16, torch.int8):
        chosen = describe_decode_attention(cpu, torch.bfloat16, D, D, dtype)
        print(f"{dtype} cache: {chosen['kernel']}" + (f" ({chosen['reason']})" if chosen["reason"] else ""))
    ops = cpu_ext.ops()
    reads = ", ".join(f"{n} thread(s) {_read_gbs(ops, n, args.rounds):.1f} GB/s" for n in args.threads)
    print(f"{args.layers} layers per sweep, median of {args.rounds} rounds; streaming read: {reads}\n")
    print("| context | batch | threads | bf16 ms | int8 ms | int8 / bf16 | bf16 GB/s | int8 GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for context in args.contexts:
        for batch in args.batches:
            caches, tables = _caches(context, batch, args.layers)
            lens = torch.full((batch,), context, dtype=torch.long)
            q = torch.randn(batch, H, D, generator=torch.Generator().manual_seed(1)).bfloat16()
            k8, v8 = caches[0][2:]
            deq = kv_quant.dequantize_rows(k8, torch.float32), kv_quant.dequantize_rows(v8, torch.float32)
            want = ops.paged_decode_attention(q, *deq, tables, lens, PAGE, D**-0.5).float()
            got = ops.paged_decode_attention(q, k8, v8, tables, lens, PAGE, D**-0.5).float()
            assert torch.allclose(got, want, atol=2e-2), (got - want).abs().max()
            keys = batch * context * HKV
            read = {"bf16": keys * 2 * D * 2, "int8": keys * 2 * (D + kv_quant.SCALE_BYTES)}
            for threads in args.threads:
                torch.set_num_threads(threads)
                times: dict[str, list[float]] = {"bf16": [], "int8": []}
                for int8 in (False, True):  # warm-up sweep each
                    _sweep(ops, q, caches, tables, lens, int8)
                for _ in range(args.rounds):  # alternating: the machine's load hits both alike
                    for name, int8 in (("bf16", False), ("int8", True)):
                        times[name].append(_sweep(ops, q, caches, tables, lens, int8))
                med = {name: statistics.median(t) for name, t in times.items()}
                print(
                    f"| {context} | {batch} | {threads} | {med['bf16'] * 1e3:.3f} | {med['int8'] * 1e3:.3f} | "
                    f"{med['int8'] / med['bf16']:.2f} | {read['bf16'] / med['bf16'] / 1e9:.1f} | "
                    f"{read['int8'] / med['int8'] / 1e9:.1f} |",
                    flush=True,
                )
            del caches


if __name__ == "__main__":
    main()
