"""GPU throughput: a Qwen2.5-0.5B-shaped W4A16 model against the same model dense in bf16, on one GPU,
with the memory-bandwidth roofline measured in the same run.

Builds (under --work, default out/bench-cuda) random bf16 weights in Qwen2.5-0.5B's geometry and
their `anyquant quantize --format compressed-tensors --scheme W4A16` (int4, groups of 128), then
measures on the GPU, both models in one process:

- prefill tokens/s: one prompt of --prompt-len tokens (one forward, logits of the last row);
- decode tokens/s at batch 1, 8 and 32: the engine's own steps (LLM.generate, greedy, eager):
  (time for prompt + D tokens - time for prompt + 1 token) per D * batch tokens;
- the layer kernels alone (CUDA events): one MLP's projections at 1 / 8 / 32 rows;
- the roofline: a device-to-device copy (bytes read + written per second), and the decode
  limit it sets: bytes every decode step reads (weights but the embedding table) / bandwidth.

GPU name, compute capability, driver and torch/CUDA versions are printed with every figure.

    python benchmarks/cuda_decode.py [--json out.json] [--decode-len 64] [--prompt-len 512]
    python benchmarks/cuda_decode.py --tiny --device cpu    # a dry run of this script's code paths
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from decode_cpu import DENSE as QWEN_0_5B

# The Qwen2.5-0.5B geometry of the CPU decode benchmark (run from benchmarks/), with its token ids.
DENSE = {**QWEN_0_5B, "bos_token_id": 151643, "eos_token_id": 151645}
TINY = {**DENSE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "bos_token_id": 256, "eos_token_id": 257}  # fmt: skip
BATCHES = (1, 8, 32)


def gpu_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {
            "gpu": "none (CPU dry run)",
            "capability": "-",
            "driver": "-",
            "torch": torch.__version__,
            "cuda": None,
        }
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi unavailable)"
    return {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def build(work: Path, config: dict[str, Any]) -> tuple[Path, Path, dict[str, float]]:
    """The dense bf16 checkpoint and its W4A16 quantization (kept between runs)."""
    from safetensors.torch import save_file

    from anyquant.convert.quantize import quantize_checkpoint
    from anyquant.quant.formats.base import WriteOptions
    from anyquant.utils.tiny_model import byte_tokenizer_json, random_weights

    dense, w4 = work / "qwen2.5-0.5b-shape-bf16", work / "qwen2.5-0.5b-shape-w4a16"
    times = {}
    if not (dense / "config.json").exists():
        t0 = time.perf_counter()
        dense.mkdir(parents=True, exist_ok=True)
        save_file(
            random_weights(config, seed=0, std=0.02),
            str(dense / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (dense / "tokenizer.json").write_text(byte_tokenizer_json())
        (dense / "config.json").write_text(json.dumps(config, indent=2))
        times["write_dense_s"] = time.perf_counter() - t0
    if not (w4 / "config.json").exists():
        t0 = time.perf_counter()
        quantize_checkpoint(
            dense, w4, "compressed-tensors", WriteOptions(scheme="W4A16", group_size=128), overwrite=True
        )
        times["quantize_s"] = time.perf_counter() - t0
    return dense, w4, times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_time(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call of `fn` (CUDA events around `iters` calls after a warm-up on a GPU)."""
    fn()
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = min(device_time(lambda: dst.copy_(src), 10, device) for _ in range(3))
    return 2 * nbytes / best / 1e9


def decode_bytes(path: Path) -> int:
    """Bytes a decode step reads: every tensor but the embedding table; a tied LM head in full."""
    from anyquant.loading.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    total = 0
    for name in ckpt.index:
        info = ckpt.index.info(name)
        if name != "model.embed_tokens.weight" or "lm_head.weight" not in ckpt.index:
            total += info.numel * info.torch_dtype.itemsize
    return total


def bench_model(path: Path, prompt_len: int, decode_len: int, device: torch.device) -> dict[str, Any]:
    from anyquant import LLM, SamplingParams
    from anyquant.engine.kv_cache import SequenceCache

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    llm = LLM(
        str(path),
        device=str(device),
        dtype="bfloat16",
        enforce_eager=True,
        max_num_seqs=max(BATCHES),
        max_model_len=prompt_len + decode_len + 8,
        kv_cache_gb=2.0,
    )
    sync(device)
    load_s = time.perf_counter() - t0
    kernels = sorted({m.kernel.name for m in llm.model.modules() if getattr(m, "kernel", None) is not None})
    vocab = int(llm.loaded.config["vocab_size"])
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    last = torch.tensor([prompt_len - 1], device=device)

    def prefill() -> None:
        SequenceCache(llm.model, prompt_len, llm.dtype, llm.device).forward(prompt, 0, last)

    prefill()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(3):
        prefill()
    sync(device)
    prefill_tok_s = 3 * prompt_len / (time.perf_counter() - t1)
    # The model alone at batch 1 (no scheduler, no sampler): greedy steps through a private cache.
    seq = SequenceCache(llm.model, prompt_len + decode_len + 1, llm.dtype, llm.device)
    token = int(seq.forward(prompt, 0, last)[-1].argmax())
    t2 = time.perf_counter()
    for i in range(decode_len):
        token = int(seq.forward([token], prompt_len + i)[-1].argmax())  # int(): one sync per step
    model_only_tok_s = decode_len / (time.perf_counter() - t2)
    decode: dict[int, float] = {}
    for batch in BATCHES:
        prompts = [
            {"prompt_token_ids": torch.randint(0, vocab, (32,), generator=g).tolist()} for _ in range(batch)
        ]

        def run(tokens: int, prompts: list[dict[str, Any]] = prompts) -> float:
            params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            sync(device)
            assert all(len(o.token_ids) == tokens for o in outs)
            return time.perf_counter() - t

        run(4)  # warm-up at this batch size
        first, full = run(1), run(1 + decode_len)
        decode[batch] = batch * decode_len / max(full - first, 1e-9)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    llm.close()
    return {
        "load_s": load_s,
        "kernels": kernels,
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode,
        "model_only_b1_tok_s": model_only_tok_s,
        "peak_gpu_mib": peak / 2**20,
    }


def bench_layers(device: torch.device) -> list[dict[str, Any]]:
    """One MLP's projections (gate+up merged 9728 x 896, down 896 x 4864) alone: tinygemm int4 vs
    a dense bf16 matmul of the same shape, microseconds per call."""
    from anyquant.quant.kernels.cuda import CudaInt4TinygemmKernel
    from anyquant.quant.spec import QuantSpec
    from anyquant.quant.weight import QuantWeight

    rows = []
    spec = QuantSpec("uint4", "group", group_size=128)
    for n, k in ((9728, 896), (896, 4864)):
        g = torch.Generator(device=device).manual_seed(0)
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device, generator=g)
        scale = torch.rand(n, k // 128, device=device, generator=g) * 0.01
        kernel = CudaInt4TinygemmKernel((n, k), torch.bfloat16)
        kernel.load(QuantWeight(spec, (n, k), codes, scale))
        dense = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g)
        for t in BATCHES:
            x = torch.randn(t, k, device=device, dtype=torch.bfloat16, generator=g)
            us_int4 = device_time(lambda x=x, kernel=kernel: kernel(x), 200, device) * 1e6
            us_dense = device_time(lambda x=x, w=dense: torch.nn.functional.linear(x, w), 200, device) * 1e6
            rows.append({"shape": f"{n}x{k}", "rows": t, "int4_us": us_int4, "bf16_us": us_dense})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("out/bench-cuda"))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead (a dry run of the script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing measured"
        )
        return 2
    info = gpu_info()
    print("device: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    bandwidth = copy_bandwidth_gbs(device, (64 << 20) if args.tiny else (1 << 30))
    print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)", flush=True)
    work = args.work / "tiny" if args.tiny else args.work
    dense, w4, build_times = build(work, TINY if args.tiny else DENSE)
    print("built: " + ", ".join(f"{k} {v:.1f}" for k, v in build_times.items()), flush=True)
    layers = bench_layers(device) if device.type == "cuda" else []
    results = {}
    for name, path in (("dense bf16", dense), ("W4A16 g128", w4)):
        r = bench_model(path, args.prompt_len, args.decode_len, device)
        gc.collect()  # the model of the last run goes before the next one loads
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r["decode_bytes"] = decode_bytes(path)
        r["batch1_limit_tok_s"] = bandwidth * 1e9 / r["decode_bytes"]
        results[name] = r
        print(f"{name}: {json.dumps(r)}", flush=True)
    print(
        f"\n### {info['gpu']} (sm{info['capability']}, driver {info['driver']}, torch {info['torch']}, CUDA {info['cuda']})\n"
    )
    print(
        f"| model | kernels | prefill tok/s (1 x {args.prompt_len}) | decode tok/s b1 | b8 | b32 | "
        "model alone b1 | b1 limit tok/s | MiB read/token | peak GPU MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        d = r["decode_tok_s"]
        print(
            f"| {name} | {', '.join(r['kernels'])} | {r['prefill_tok_s']:.0f} | {d[1]:.1f} | {d[8]:.1f} | "
            f"{d[32]:.1f} | {r['model_only_b1_tok_s']:.1f} | {r['batch1_limit_tok_s']:.0f} | "
            f"{r['decode_bytes'] / 2**20:.0f} | {r['peak_gpu_mib']:.0f} |"
        )
    print("\n| layer | rows | int4 tinygemm us | bf16 dense us | int4 / dense |")
    print("|---|---:|---:|---:|---:|")
    for row in layers:
        print(
            f"| {row['shape']} | {row['rows']} | {row['int4_us']:.1f} | {row['bf16_us']:.1f} | {row['int4_us'] / row['bf16_us']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"device": info, "copy_gbs": bandwidth, "models": results, "layers": layers}, indent=2)
        )
    w, d = results["W4A16 g128"], results["dense bf16"]
    print(
        f"\nSUMMARY {info['gpu']} driver {info['driver']}: decode b1 W4A16 {w['decode_tok_s'][1]:.1f} vs bf16 "
        f"{d['decode_tok_s'][1]:.1f} tok/s (limits {w['batch1_limit_tok_s']:.0f} / {d['batch1_limit_tok_s']:.0f}); "
        f"b32 {w['decode_tok_s'][32]:.0f} vs {d['decode_tok_s'][32]:.0f}; prefill {w['prefill_tok_s']:.0f} vs "
        f"{d['prefill_tok_s']:.0f} tok/s; copy {bandwidth:.0f} GB/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
