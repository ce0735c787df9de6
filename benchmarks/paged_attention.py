"""One layer's decode attention over a paged cache: the candidate implementations, interleaved.

Qwen2.5-0.5B geometry (14 query heads, 2 KV heads, head dim 64, bf16, pages of 16), or with
`--mla` DeepSeek-V3's absorbed latent decode (128 query heads on one latent "KV head", key width
576 = latent 512 + rope 64, value width 512 = the key's first 512), pages scattered over the cache.
With `--mla` the torch and C++ candidates run twice: on a cache storing the value separately
("2x", the layout before the latent was stored once) and on the engine's cache, where the value is
a view of the key ("1x"). Candidates:

- `per-sequence` (the engine's previous implementation): per sequence, index_select its slots,
  repeat K/V for GQA, build a mask, SDPA;
- `paged sdpa`: gather the reached pages of all sequences into one padded batch [Hkv, B, S, D]
  (pages scattered: a real gather), one fused SDPA with a mask, queries as [Hkv, B, group] rows;
- `paged matmul`: same reads, scores / softmax / values as two matmuls and an fp32 softmax.

- `C++ kernel`: `anyquant_cpu::paged_decode_attention` (layers/decode_kernel.py), K/V read in place
  through the block tables, all sequences in one call.

Without the C++ kernel the engine picks `paged sdpa` below `MATMUL_DECODE_MIN_KEYS` keys and
`paged matmul` above; with it, the kernel (AVX-512, or AVX2 + FMA on CPUs without it: the header
line says which; where neither runs, the `C++ kernel` column is the torch path). Times are CPU time
of the thread with one torch thread (wall time on a loaded shared machine is mostly waiting), wall
time with more (`OMP_NUM_THREADS=2`: the kernel and torch's ops use both); best of the rounds.

    python benchmarks/paged_attention.py [--contexts 128 4096] [--batches 1 8] [--mla]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.layers import attention
from anyquant.layers.attention import PagedPlan, paged_attention, plan_paged_attention
from anyquant.layers.decode_kernel import decode_kernel_mode, describe_decode_attention, set_decode_kernel

H, HKV, D, DV, PAGE = 14, 2, 64, 64, 16
DTYPE = torch.bfloat16


def per_sequence(ctx: PagedAttention, q: torch.Tensor) -> torch.Tensor:
    keys, values = ctx.cache.k[0], ctx.cache.v[0]  # [Hkv, slots, D]
    out, at = [], 0
    for b, (n, total) in enumerate(zip(ctx.query_lens, ctx.context_lens)):
        pos = torch.arange(total)
        slots = ctx.block_tables[b][pos // PAGE] * PAGE + pos % PAGE
        k = keys.index_select(1, slots).repeat_interleave(H // HKV, dim=0)  # [H, S, D]
        v = values.index_select(1, slots).repeat_interleave(H // HKV, dim=0)
        mask = torch.arange(total)[None, :] <= (total - n + torch.arange(n))[:, None]
        o = F.scaled_dot_product_attention(
            q[at : at + n].transpose(0, 1), k, v, attn_mask=mask, scale=D**-0.5
        )
        out.append(o.transpose(0, 1).reshape(n, -1))
        at += n
    return torch.cat(out)


def paged(
    matmul_min_keys: int, mode: str, prefill_rows: int = 0
) -> Callable[[PagedAttention, torch.Tensor], torch.Tensor]:
    """`mode`: "auto" runs the C++ kernel, "torch" the pure-torch decode (layers/decode_kernel.py);
    prefill chunks of at most `prefill_rows` tokens run as decode rows through the kernel."""
    # the engine plans once per step, not per layer; the context is kept so that its id is not reused
    plans: dict[int, tuple[PagedAttention, PagedPlan]] = {}

    def run(ctx: PagedAttention, q: torch.Tensor) -> torch.Tensor:
        if id(ctx) in plans:
            plan = plans[id(ctx)][1]
        else:
            plan = plan_paged_attention(
                ctx.block_tables, ctx.query_lens, ctx.context_lens, PAGE, None, matmul_min_keys, prefill_rows
            )
            plans[id(ctx)] = (ctx, plan)
        before = decode_kernel_mode(), attention.KERNEL_PREFILL_ROWS_PER_GROUP
        set_decode_kernel(mode)
        attention.KERNEL_PREFILL_ROWS_PER_GROUP = prefill_rows  # the rows taken whatever the group
        try:
            return paged_attention(q, ctx.cache.k[0], ctx.cache.v[0], plan, PAGE, D**-0.5)
        finally:
            set_decode_kernel(before[0])
            attention.KERNEL_PREFILL_ROWS_PER_GROUP = before[1]

    return run


def _time(fn: Callable[[], object], repeats: int) -> float:
    # one thread: its CPU time; more: wall time (the calling thread's CPU time misses the others')
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    t0 = clock()
    for _ in range(repeats):
        fn()
    return (clock() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mla", action="store_true", help="DeepSeek-V3 latent decode shapes")
    parser.add_argument(
        "--prefill",
        type=int,
        nargs="+",
        default=None,
        help="instead of decode: chunks of these many new tokens per sequence on a cached prefix "
        "(the context counts them), SDPA over the gathered pages vs the kernel's decode rows",
    )
    args = parser.parse_args()
    global H, HKV, D, DV
    if args.mla:
        H, HKV, D, DV = 128, 1, 576, 512
    chosen = describe_decode_attention(torch.device("cpu"), DTYPE, D, DV)
    print(
        f"{torch.get_num_threads()} thread(s); C++ kernel column: {chosen['kernel']}"
        + (f" ({chosen['reason']})" if chosen["reason"] else "")
        + "\n"
    )
    if args.prefill:
        prefill(args)
        return
    candidates = {
        "per-sequence": per_sequence,
        "paged sdpa": paged(1 << 30, "torch"),
        "paged matmul": paged(0, "torch"),
        "C++ kernel": paged(0, "auto"),
    }
    if args.mla:
        del candidates["per-sequence"]  # 128 heads x 4096 keys repeated: slow and says nothing new
    names = [f"{n} {tag}" for tag in ("2x", "1x") for n in candidates] if args.mla else list(candidates)
    print("| context | batch | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for context in args.contexts:
        for batch in args.batches:
            cache, tables = _random_cache(context, batch)
            if args.mla:
                cache.v.copy_(cache.k[..., :DV])  # the value is the latent, the key's first DV values
            seqs = [(pages, context - 1, 1) for pages in tables]
            ctx = PagedAttention.for_sequences(cache, seqs)
            runs = {name: (fn, ctx) for name, fn in candidates.items()}
            if args.mla:
                once = PagedKVCache(1, cache.num_pages, PAGE, HKV, D, DV, DTYPE, value_in_key=True)
                once.k.copy_(cache.k)
                ctx_once = PagedAttention.for_sequences(once, seqs)
                runs = {
                    f"{name} {tag}": (fn, c)
                    for tag, c in (("2x", ctx), ("1x", ctx_once))
                    for name, fn in candidates.items()
                }
            q = torch.randn(batch, H, D, dtype=DTYPE)
            ref = per_sequence(ctx, q).float() if not args.mla else paged(1 << 30, "torch")(ctx, q).float()
            for name, (fn, c) in runs.items():  # all agree before any is timed
                assert torch.allclose(fn(c, q).float(), ref, atol=2e-2), name
            best = {name: float("inf") for name in runs}
            for _ in range(args.rounds):  # interleaved rounds: the machine's load hits all alike
                for name, (fn, c) in runs.items():
                    best[name] = min(best[name], _time(functools.partial(fn, c, q), args.repeats))
            print(f"| {context} | {batch} | " + " | ".join(f"{best[n] * 1e3:.3f}" for n in runs) + " |")


def _random_cache(context: int, batch: int) -> tuple[PagedKVCache, list[list[int]]]:
    """A one-layer cache of random K/V and each of `batch` sequences' pages for `context` tokens,
    the pages shuffled over the cache (as a long-running server's are)."""
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq + 1
    cache = PagedKVCache(1, num_pages, PAGE, HKV, D, DV, DTYPE)
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(0)).tolist()
    return cache, [order[b * pages_per_seq : (b + 1) * pages_per_seq] for b in range(batch)]


def prefill(args: argparse.Namespace) -> None:
    """Prefill chunks of n new tokens whose prefix is cached: the engine's SDPA over the gathered
    pages vs n decode rows per sequence through the C++ kernel (K/V read in place, per row)."""
    runs = {
        "sdpa (gathered pages)": paged(1 << 30, "auto", 0),
        "C++ decode rows": paged(1 << 30, "auto", 1 << 30),
    }
    print("| context | batch | new tokens | " + " | ".join(f"{n} ms" for n in runs) + " | kernel / sdpa |")
    print("|---:|---:|---:|" + "---:|" * (len(runs) + 1))
    for context in args.contexts:
        for batch in args.batches:
            cache, tables = _random_cache(context, batch)
            for n in args.prefill:
                seqs = [(pages, context - n, n) for pages in tables]
                ctx = PagedAttention.for_sequences(cache, seqs)
                q = torch.randn(batch * n, H, D, dtype=DTYPE)
                ref = per_sequence(ctx, q).float()
                for name, fn in runs.items():
                    assert torch.allclose(fn(ctx, q).float(), ref, atol=2e-2), name
                best = {name: float("inf") for name in runs}
                for _ in range(args.rounds):
                    for name, fn in runs.items():
                        best[name] = min(best[name], _time(functools.partial(fn, ctx, q), args.repeats))
                times = list(best.values())
                print(
                    f"| {context} | {batch} | {n} | "
                    + " | ".join(f"{t * 1e3:.3f}" for t in times)
                    + f" | {times[1] / times[0]:.2f} |"
                )


if __name__ == "__main__":
    main()
