"""CPU throughput: anyquant vs transformers on the same int4 checkpoint, and the bandwidth limit.

Builds (once, under out/bench/) a random-weight Qwen2.5-0.5B-shaped model and a small Qwen3-MoE,
quantizes both with `anyquant quantize --format compressed-tensors --scheme W4A16` (a checkpoint
transformers + compressed-tensors can also run on CPU), then measures in one run, side by side:
prompt (prefill) tokens/s and batch-1 greedy decode tokens/s for anyquant and for transformers, and
the decode limit set by memory bandwidth (bytes read per token / measured copy bandwidth).

    python benchmarks/decode_cpu.py [--models dense moe] [--prompt-len 128] [--decode-len 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from anyquant.bench.offline import bench_offline, measure_copy_bandwidth_gbs
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.loading.checkpoint import Checkpoint
from anyquant.quant.formats.base import WriteOptions

OUT = Path("out/bench")

DENSE = {  # Qwen2.5-0.5B geometry
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
MOE = {  # a small Qwen3-MoE: 8 layers, 32 experts, top-4
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "moe_intermediate_size": 256,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def build(name: str, config: dict) -> Path:
    """Random bf16 weights saved by transformers (real names), then anyquant's W4A16 quantization."""
    import transformers

    dense_dir, quant_dir = OUT / f"{name}-bf16", OUT / f"{name}-w4a16"
    if not (quant_dir / "config.json").exists():
        if not (dense_dir / "config.json").exists():
            torch.manual_seed(0)
            cfg = transformers.AutoConfig.for_model(
                config["model_type"], **{k: v for k, v in config.items() if k not in ("model_type",)}
            )
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
            model.save_pretrained(dense_dir)
        quantize_checkpoint(
            dense_dir, quant_dir, "compressed-tensors", WriteOptions(scheme="W4A16"), overwrite=True
        )
    return quant_dir


def bytes_per_token(path: Path) -> int:
    """Bytes every decode step reads: all tensors except the embedding table (one row is read);
    the LM head counts in full (tied or not)."""
    ckpt = Checkpoint(path)
    total = 0
    for name in ckpt.index:
        info = ckpt.index.info(name)
        n = info.numel * info.torch_dtype.itemsize
        total += 0 if name == "model.embed_tokens.weight" else n
    if "lm_head.weight" not in ckpt.index:
        info = ckpt.index.info("model.embed_tokens.weight")
        total += info.numel * info.torch_dtype.itemsize
    return total


def bench_transformers(path: Path, prompt_len: int, decode_len: int, repeats: int) -> dict[str, float]:
    import transformers

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    load = time.perf_counter() - t0
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prefill, decode = [], []
    with torch.inference_mode():
        model(prompt)  # warm-up
        for _ in range(repeats):
            t1 = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill.append(prompt_len / (time.perf_counter() - t1))
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(decode_len):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append(decode_len / (time.perf_counter() - t2))
    return {
        "load_s": load,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    bandwidth = measure_copy_bandwidth_gbs()
    rows = []
    for name in args.models:
        path = build(name, DENSE if name == "dense" else MOE)
        per_token = bytes_per_token(path)
        ours = bench_offline(str(path), "bfloat16", args.prompt_len, args.decode_len, args.repeats)
        theirs = bench_transformers(path, args.prompt_len, args.decode_len, args.repeats)
        rows.append(
            {
                "model": name,
                "checkpoint": str(path),
                "threads": torch.get_num_threads(),
                "bytes_per_token_mib": per_token / 2**20,
                "copy_bandwidth_gbs": bandwidth,
                "bandwidth_limit_tok_s": bandwidth * 1e9 / per_token,
                "anyquant": {
                    "load_s": ours.load_s,
                    "prefill_tok_s": ours.prefill_tok_s,
                    "decode_tok_s": ours.decode_tok_s,
                    "peak_rss_mib": ours.peak_rss_mib,
                },
                "transformers": theirs,
            }
        )
    print("| model | engine | prefill tok/s | decode tok/s | decode limit tok/s | load s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        for engine in ("anyquant", "transformers"):
            e = r[engine]
            print(
                f"| {r['model']} | {engine} | {e['prefill_tok_s']:.1f} | {e['decode_tok_s']:.2f} | "
                f"{r['bandwidth_limit_tok_s']:.1f} | {e['load_s']:.1f} |"
            )
    print(
        f"\ncopy bandwidth {bandwidth:.1f} GB/s, {torch.get_num_threads()} threads; bytes/token: "
        + ", ".join(f"{r['model']} {r['bytes_per_token_mib']:.0f} MiB" for r in rows)
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
