"""Expert parallelism: what combining the experts' outputs costs over gloo, per MoE layer.

Two ways to get every rank the full MoE output when each rank holds whole experts:
  reduce      every rank routes every token (the router and its input are replicated, as they are
              under tensor parallelism), computes its own experts' share and one fp32 all-reduce of
              [T, hidden] sums the shares: what `SparseMoE` does.
  all-to-all  tokens are sharded (T / N per rank), each (token, expert) pair's bf16 hidden state is
              sent to the expert's owner (counts first, then an uneven all_to_all_single), the fp32
              outputs come back the same way, and an all-gather re-replicates [T, hidden] for the
              tensor-parallel attention that follows. Only the communication is timed (no experts).

Run: python benchmarks/ep_comm.py [--world 2] [--tokens 2 32 512] (at least `world` tokens, so
that every rank holds one for the all-to-all way: gloo does not take empty exchanges). Spawns `world` gloo ranks with
one thread each; the two ways alternate inside one run, medians of `--repeats` rounds are printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anyquant.parallel.partition import place_experts
from anyquant.parallel.state import free_port


def reduce_way(out: torch.Tensor) -> None:
    dist.all_reduce(out)


def all_to_all_way(x: torch.Tensor, ids: torch.Tensor, owner: torch.Tensor, world: int, rank: int) -> None:
    t = x.shape[0]
    mine = slice(rank * t // world, (rank + 1) * t // world)
    dest = owner[ids[mine]].reshape(-1)  # owner rank of each of my (token, slot) pairs
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    k = ids.shape[1]
    rows = x[mine].to(torch.bfloat16).repeat_interleave(k, dim=0)[order]
    send, recv = send_counts.tolist(), recv_counts.tolist()
    got = torch.empty(sum(recv), x.shape[1], dtype=torch.bfloat16)
    dist.all_to_all_single(got, rows, recv, send)
    back = torch.empty(rows.shape[0], x.shape[1], dtype=torch.float32)
    dist.all_to_all_single(back, got.float(), send, recv)
    part = torch.zeros(mine.stop - mine.start, x.shape[1])
    full = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(full, part)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    placement = place_experts(args.experts, world, "bench")
    owner = torch.tensor([placement.owner(e) for e in range(args.experts)])
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, args.hidden, generator=g)
        ids = torch.rand(tokens, args.experts, generator=g).topk(args.top_k, dim=-1).indices
        times: dict[str, list[float]] = {"reduce": [], "all-to-all": []}
        for _ in range(args.repeats):
            for name in times:
                dist.barrier()
                t0 = time.perf_counter()
                if name == "reduce":
                    reduce_way(x.clone())
                else:
                    all_to_all_way(x, ids, owner, world, rank)
                times[name].append(time.perf_counter() - t0)
        if rank == 0:
            results[tokens] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2, 32, 512])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        mp.start_processes(
            _rank, args=(args.world, free_port(), args, out), nprocs=args.world, start_method="spawn"
        )
        results = json.loads(out.read_text())
    print(f"gloo, {args.world} ranks, hidden {args.hidden}, {args.experts} experts, top-{args.top_k}")
    print(f"{'tokens':>7} {'reduce ms':>10} {'all-to-all ms':>14} {'ratio':>6}")
    for tokens in args.tokens:
        r = results[str(tokens)]
        ratio = r["all-to-all"] / r["reduce"]
        print(f"{tokens:>7} {r['reduce']:>10.3f} {r['all-to-all']:>14.3f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
