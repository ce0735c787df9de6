"""Quantized MoE on CPU: Qwen3-30B-A3B shapes, a few layers, random weights, W4A16 g128 experts.

Builds (once, under out/bench/) a bf16 checkpoint with Qwen3-30B-A3B's geometry (hidden 2048,
128 experts, top-8, expert intermediate 768, 32 query / 4 KV heads of 128, vocab 151936) but only
`--layers` decoder layers, written tensor by tensor with safetensors (transformers would need the
whole fp32 model in memory), then quantizes it with `anyquant quantize --format compressed-tensors
--scheme W4A16` (int4, groups of 128, symmetric; routers stay bf16). It then runs
`anyquant bench offline` on it for each source tree given with `--tree NAME=PATH` (e.g. the
commit before a change and after it), alternating between the trees `--rounds` times in fresh
processes, and prints prefill / batch-1 decode tokens/s and peak RSS per tree.

    python benchmarks/moe_cpu.py --tree before=/tmp/base --tree after=. [--layers 3] [--rounds 2]

`--ab` instead loads the model once and alternates, in the same process, between the fused MoE
call (one C++ call per layer) and the per-expert path over the same kernels and the same weights:
whole-model prefill / batch-1 decode, and one MoE layer alone at 1, 8, 32 and 512 tokens; it
prints medians and fused / per-expert ratios.

    python benchmarks/moe_cpu.py --ab [--layers 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from anyquant.convert.quantize import quantize_checkpoint
from anyquant.quant.formats.base import WriteOptions

OUT = Path("out/bench")

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def _randn(g: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write_dense(path: Path, layers: int, seed: int = 0) -> Path:
    """The bf16 checkpoint: one safetensors shard per decoder layer (plus one for the rest)."""
    cfg = {**QWEN3_30B_A3B, "num_hidden_layers": layers}
    h, v, heads, kv, hd = (cfg[k] for k in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim"))  # fmt: skip
    experts, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    ones = torch.ones(h, dtype=torch.bfloat16)
    shard(
        "model-embed.safetensors",
        {
            "model.embed_tokens.weight": _randn(g, v, h),
            "lm_head.weight": _randn(g, v, h),
            "model.norm.weight": ones,
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {
            f"{p}.input_layernorm.weight": ones.clone(),
            f"{p}.post_attention_layernorm.weight": ones.clone(),
            f"{p}.self_attn.q_proj.weight": _randn(g, heads * hd, h),
            f"{p}.self_attn.k_proj.weight": _randn(g, kv * hd, h),
            f"{p}.self_attn.v_proj.weight": _randn(g, kv * hd, h),
            f"{p}.self_attn.o_proj.weight": _randn(g, h, heads * hd),
            f"{p}.self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            f"{p}.self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            f"{p}.mlp.gate.weight": _randn(g, experts, h, std=0.5),
        }
        for e in range(experts):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = _randn(g, inter, h)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = _randn(g, inter, h)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = _randn(g, h, inter)
        shard(f"model-layer{i:02d}.safetensors", t)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def build(layers: int) -> Path:
    dense, quant = OUT / f"qwen3moe-a3b-{layers}l-bf16", OUT / f"qwen3moe-a3b-{layers}l-w4a16"
    if not (quant / "config.json").exists():
        if not (dense / "config.json").exists():
            write_dense(dense, layers)
        quantize_checkpoint(dense, quant, "compressed-tensors", WriteOptions(scheme="W4A16"), overwrite=True)
    return quant


def bench_tree(tree: Path, model: Path, prompt_len: int, decode_len: int) -> dict[str, float]:
    """One `anyquant bench offline` run in a fresh process importing `tree`'s anyquant."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    cmd = [sys.executable, "-m", "anyquant", "bench", "offline", str(model), "--dtype", "bfloat16"]
    cmd += ["--prompt-len", str(prompt_len), "--decode-len", str(decode_len), "--repeats", "2", "--json"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{") :])


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn`: CPU time of this process with one thread (what the work costs,
    whatever else the shared machine runs), wall-clock time with more threads."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    runs = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        runs.append(clock() - t0)
    return statistics.median(runs)


def ab_in_process(model: Path, rounds: int, prompt_len: int, decode_len: int) -> None:
    """Fused vs per-expert MoE, alternating in one process on one loaded model (same weights)."""
    from anyquant.engine.kv_cache import SequenceCache
    from anyquant.layers.moe import SparseMoE
    from anyquant.llm import LLM

    llm = LLM(str(model), dtype="bfloat16")
    blocks = [m for m in llm.model.modules() if isinstance(m, SparseMoE)]
    fused = [b.fused for b in blocks]
    if any(f is None for f in fused):
        raise SystemExit(f"not fused: {blocks[0].fused_reason}")
    g = torch.Generator().manual_seed(0)
    vocab = int(llm.loaded.config["vocab_size"])
    hidden = int(llm.loaded.config["hidden_size"])
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    inputs = {t: torch.randn(t, hidden, generator=g).to(torch.bfloat16) for t in (1, 8, 32, 512)}

    def use(mode: str) -> None:
        for block, f in zip(blocks, fused):
            block.fused = f if mode == "fused" else None

    def prefill() -> SequenceCache:
        seq = SequenceCache(llm.model, prompt_len + decode_len + 1, llm.dtype, llm.device)
        seq.forward(prompt, 0, torch.tensor([prompt_len - 1]))
        return seq

    def decode(seq: SequenceCache) -> None:
        token = prompt[-1]
        for i in range(decode_len):
            token = int(seq.forward([token], prompt_len + i)[-1].argmax())

    results: dict[str, dict[str, list[float]]] = {"per-expert": {}, "fused": {}}
    with torch.inference_mode():
        for mode in results:  # warm-up
            use(mode)
            decode(prefill())
        for _ in range(rounds):
            for mode, rates in results.items():
                use(mode)
                seqs: list[SequenceCache] = []
                s = _seconds(lambda seqs=seqs: seqs.append(prefill()), 1)
                rates.setdefault("prefill tok/s", []).append(prompt_len / s)
                s = _seconds(lambda seqs=seqs: decode(seqs[-1]), 1)
                rates.setdefault("decode b1 tok/s", []).append(decode_len / s)
                for t, x in inputs.items():
                    s = _seconds(lambda x=x: blocks[0](x), 1 if t == 512 else 5)
                    rates.setdefault(f"1 MoE layer, {t} tok: ms", []).append(s * 1e3)
            print(
                json.dumps({m: {k: round(v[-1], 2) for k, v in r.items()} for m, r in results.items()}),
                flush=True,
            )
    clock = "CPU time" if torch.get_num_threads() == 1 else "wall-clock time"
    print(
        f"\n{torch.get_num_threads()} threads ({clock}), {len(blocks)} MoE layers, medians of {rounds} rounds\n"
    )
    print("| measure | per-expert | fused | speed-up |")
    print("|---|---:|---:|---:|")
    for key in results["fused"]:
        before, after = (statistics.median(results[m][key]) for m in ("per-expert", "fused"))
        speedup = before / after if key.endswith("ms") else after / before
        print(f"| {key} | {before:.2f} | {after:.2f} | {speedup:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree to run")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=16)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--ab", action="store_true", help="fused vs per-expert MoE in one process")
    args = parser.parse_args()
    model = build(args.layers)
    if args.build_only:
        return
    if args.ab:
        return ab_in_process(model, args.rounds, args.prompt_len, args.decode_len)
    trees = dict(t.split("=", 1) for t in args.tree) or {"here": "."}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(bench_tree(Path(tree), model, args.prompt_len, args.decode_len))
            print(name, json.dumps(runs[name][-1]), flush=True)
    print(
        f"\n| tree | prefill {args.prompt_len} tok/s | batch-1 decode tok/s | peak RSS MiB | linear weights MiB |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        pre = statistics.median(r["prefill_tok_s"] for r in rs)
        dec = statistics.median(r["decode_tok_s"] for r in rs)
        rss = max(r["peak_rss_mib"] for r in rs)
        print(f"| {name} | {pre:.1f} | {dec:.2f} | {rss:.0f} | {rs[0]['linear_weight_mib']:.0f} |")


if __name__ == "__main__":
    main()
