"""End to end: weight-only layers with bf16 activations vs int8 activations (`--activation-dtype`).

Loads the same checkpoint once per variant in one process (default: the Qwen2.5-0.5B-shaped W4A16
g128 model of benchmarks/decode_cpu.py) and measures, in alternation over `--rounds` rounds so a
busy spell of a shared machine hits every variant alike:
- prefill: one prompt of `--prompt-len` random ids, 1 output token; prompt tokens/s;
- decode at batch B: B prompts of `--decode-prompt-len` ids; (time of B x (1 + N) tokens - time
  of B x 1 token) / (B x N) gives the aggregate decode tokens/s.
Times are the process's CPU time (all its threads), so time the machine's other work takes from
this process is not counted; run it with one thread (OMP_NUM_THREADS=1) and read the ratios.
`--wall` times wall-clock instead, for several threads (CPU time would add the threads' times).
Fresh random prompts for every call (no prefix-cache hits). The median over rounds is reported.

    OMP_NUM_THREADS=1 python benchmarks/int8_activations.py [--variants auto:auto int8:auto]

`--stories` instead measures what int8 activations cost in perplexity on the real stories260K
model (../shared/models/stories260K, the held-out protocol of its expected_outputs.json), for
weight-only checkpoints written by `anyquant quantize`, in bfloat16 and float32 compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from anyquant import LLM, SamplingParams
from anyquant.bench.evaluate import corpus_perplexity
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.quant.formats.base import WriteOptions

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "stories260K"
BODIES = [
    ("W4A16 int4 g32 sym", "compressed-tensors", WriteOptions(scheme="W4A16", group_size=32)),
    ("W4A16_ASYM int4 g32", "compressed-tensors", WriteOptions(scheme="W4A16_ASYM", group_size=32)),
    ("W8A16 int8 g32", "compressed-tensors", WriteOptions(scheme="W8A16", group_size=32)),
    ("GPTQ int8 per-channel sym", "gptq", WriteOptions(bits=8, group_size=-1, sym=True)),
]


def stories_costs(stories: Path) -> None:
    expected = json.loads((stories / "expected_outputs.json").read_text())["perplexity_reference"]
    text = (stories / expected["file"]).read_text()
    print("| body | compute dtype | activations | LM head | perplexity | vs as stored |")
    print("|---|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, fmt, options in BODIES:
            path = Path(tmp) / label.replace(" ", "_")
            quantize_checkpoint(stories / "hf", path, fmt, options)
            for dtype in ("bfloat16", "float32"):
                base = corpus_perplexity(LLM(path, dtype=dtype), text).perplexity
                print(f"| {label} | {dtype} | as stored | as stored | {base:.4f} | |")
                for act, head in (("int8", "auto"), ("int8", "int8")):
                    llm = LLM(path, dtype=dtype, activation_dtype=act, lm_head_dtype=head)
                    ppl = corpus_perplexity(llm, text).perplexity
                    print(
                        f"| {label} | {dtype} | {act} per token | {head} | {ppl:.4f} | {ppl / base - 1:+.2%} |"
                    )


def _prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 16, (length,), generator=g).tolist() for _ in range(num)]


_CLOCK = [time.process_time]  # `--wall`: time.perf_counter


def _cpu_s(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = _CLOCK[0]()
    llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return _CLOCK[0]() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("out/bench/dense-w4a16"))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["auto:auto", "int8:auto"],
        help="ACTIVATION_DTYPE:LM_HEAD_DTYPE per variant",
    )
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-prompt-len", type=int, default=32)
    parser.add_argument("--decode-len", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stories", action="store_true", help="perplexity costs on stories260K instead")
    parser.add_argument("--stories-model", type=Path, default=STORIES, help="the stories260K folder")
    parser.add_argument(
        "--wall", action="store_true", help="wall-clock times (several threads), not CPU time"
    )
    args = parser.parse_args()
    if args.wall:
        _CLOCK[0] = time.perf_counter
    if args.stories:
        stories_costs(args.stories_model)
        return
    llms = {}
    for variant in args.variants:
        act, head = variant.split(":")
        llms[variant] = LLM(
            args.model,
            dtype="bfloat16",
            activation_dtype=act,
            lm_head_dtype=head,
            max_model_len=1024,
            max_num_seqs=64,
            kv_cache_gb=0.25,
        )
    vocab = int(next(iter(llms.values())).loaded.config["vocab_size"])
    rows = ["prefill"] + [f"decode b{b}" for b in args.batches]
    results: dict[str, dict[str, list[float]]] = {v: {r: [] for r in rows} for v in llms}
    for llm in llms.values():  # warm-up of every shape
        _cpu_s(llm, _prompts(1, args.prompt_len, vocab, 1), 1)
        for b in args.batches:
            _cpu_s(llm, _prompts(b, args.decode_prompt_len, vocab, 2), 2)
    for r in range(args.rounds):
        for i, (variant, llm) in enumerate(llms.items()):
            seed = 1000 * r + 100 * i
            s = _cpu_s(llm, _prompts(1, args.prompt_len, vocab, seed), 1)
            results[variant]["prefill"].append(args.prompt_len / s)
            for b in args.batches:
                first = _cpu_s(llm, _prompts(b, args.decode_prompt_len, vocab, seed + b), 1)
                full = _cpu_s(
                    llm, _prompts(b, args.decode_prompt_len, vocab, seed + b + 50), 1 + args.decode_len
                )
                results[variant][f"decode b{b}"].append(b * args.decode_len / max(full - first, 1e-9))
    base = args.variants[0]
    print(
        f"{args.model}, {torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds "
        f"({'wall' if args.wall else 'CPU'} time)"
    )
    print("| variant (activations:lm head) | " + " | ".join(f"{r} tok/s" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for variant in llms:
        cells = []
        for row in rows:
            value = statistics.median(results[variant][row])
            ratio = value / statistics.median(results[base][row])
            cells.append(f"{value:.1f} ({ratio:.2f}x)")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
