"""Decode tok/s with a JSON schema vs without, at batch 1 and 32, measured interleaved in one process.

Drives `Engine.step()` (everything a served decode step does) on the Qwen2.5-0.5B-shaped W4A16
checkpoint that `benchmarks/decode_cpu.py` builds, with a 151,936-token byte-level BPE tokenizer
(the same generator as the llama.cpp comparison), so each mask covers a real-size vocabulary.
Modes, alternated round by round so machine load hits them alike:
  plain     no constraint (ignore_eos, so no request ends inside the window)
  json      a JSON schema (an array of >= 500 person objects: strings, integers, enums, nested
            arrays; it cannot end inside the window), masks filled on a worker thread while the
            forward pass runs (the engine's default)
  json-seq  the same, masks filled after the forward pass (what filling during it saves)
Each measurement: admit the batch, run prefill and a few warm-up steps, then time `--steps` decode
steps in which every request decodes one token. Then the guided path alone (the engine's own
GuidedDecoder: fill, mask [batch, vocab] logits, accept the masked argmax), wall and CPU ms per step,
which a loaded machine disturbs less than whole steps.

    python benchmarks/structured_decode.py [--model out/bench/dense-w4a16] [--batches 1 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from anyquant import LLM, SamplingParams
from anyquant.engine.request import Request
from anyquant.engine.sampling import GuidedDecodingParams
from anyquant.engine.scheduler import StepPlan

sys.path.insert(0, str(Path(__file__).parent))

import llamacpp_baseline
from decode_cpu import DENSE, OUT, build

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["name", "age", "email", "role", "tags"],
}
SCHEMA = {"type": "array", "items": PERSON, "minItems": 500}
MODES = ("plain", "json", "json-seq")


def model_with_tokenizer(model: Path) -> Path:
    """config.json and a link to the weights beside a full-size tokenizer, under out/bench/."""
    target = OUT / f"{model.name}-with-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(model / "config.json", target / "config.json")
    weights = target / "model.safetensors"
    if not weights.exists():
        weights.symlink_to((model / "model.safetensors").resolve())
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    llamacpp_baseline.ensure_tokenizer([target], vocab)
    return target


def measure(llm: LLM, mode: str, batch: int, steps: int, warmup: int) -> float:
    """Decode tokens/s of `batch` requests over `steps` steps."""
    engine = llm.engine
    engine.guided.overlap = mode != "json-seq"
    guided = GuidedDecodingParams(json=SCHEMA) if mode != "plain" else None
    params = SamplingParams(
        max_tokens=warmup + steps + 8, temperature=0.0, ignore_eos=True, guided_decoding=guided
    )
    g = torch.Generator().manual_seed(batch)
    ids = [
        engine.add_request(torch.randint(1000, 100000, (16,), generator=g).tolist(), params)
        for _ in range(batch)
    ]
    made = dict.fromkeys(ids, 0)

    def step() -> int:
        n = 0
        for delta in engine.step():
            made[delta.request_id] += len(delta.new_token_ids)
            n += len(delta.new_token_ids)
            if delta.finished:
                raise RuntimeError(f"{delta.request_id} finished inside the window: {delta.finish_reason}")
        return n

    while min(made.values()) < warmup:  # prefill, then warm-up decode steps
        step()
    start = time.perf_counter()
    tokens = sum(step() for _ in range(steps))
    seconds = time.perf_counter() - start
    for rid in ids:
        engine.abort(rid)
    if tokens != steps * batch:
        raise RuntimeError(f"{tokens} tokens in {steps} steps of {batch} requests")
    return tokens / seconds


def mask_path_ms(llm: LLM, batch: int, steps: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of one step's guided work for `batch` requests."""
    guided = llm.engine.guided
    previous, guided.overlap = (
        guided.overlap,
        False,
    )  # measured inline: the CPU time is this thread's and the pool's alike
    params = SamplingParams(guided_decoding=GuidedDecodingParams(json=SCHEMA))
    requests = [Request(f"mask-{batch}-{i}", [1, 2], params) for i in range(batch)]
    for r in requests:
        r.num_computed_tokens = 1  # one token left to compute: each samples this "step"
        guided.add(r.request_id, params.guided_decoding)  # type: ignore[arg-type]
    plan = StepPlan(scheduled=[(r, 1) for r in requests])
    ids = [r.request_id for r in requests]
    g = torch.Generator().manual_seed(0)
    wall, cpu = [], []
    for _ in range(steps):
        logits = torch.randn(batch, guided.compiler.vocab_size, generator=g)
        t0, c0 = time.perf_counter(), time.process_time()
        masks = guided.begin_step(plan)
        # Greedy, as in the decode runs; random logits' argmax is nearly never allowed, so every
        # row is masked: the worst case of the greedy shortcut.
        chosen = guided.apply(masks, ids, logits, logits.argmax(dim=-1).tolist(), set(ids))
        for rid, token in zip(ids, chosen):
            if not guided.accept(rid, token):
                raise RuntimeError(f"{rid}: token {token} refused")
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    for rid in ids:
        guided.remove(rid)
    guided.overlap = previous
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=OUT / "dense-w4a16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mask-only", action="store_true", help="only the guided path alone")
    args = parser.parse_args()
    if not (args.model / "model.safetensors").exists():
        args.model = build("dense", DENSE)
    path = model_with_tokenizer(args.model)
    llm = LLM(path, dtype="bfloat16", max_model_len=512, max_num_seqs=max(args.batches))
    start = time.perf_counter()
    llm.engine.grammars.compile(GuidedDecodingParams(json=SCHEMA))
    print(f"vocabulary view + first compile: {time.perf_counter() - start:.2f} s")
    rows = []
    for batch in [] if args.mask_only else args.batches:
        results: dict[str, list[float]] = {mode: [] for mode in MODES}
        measure(llm, "json", batch, 4, args.warmup)  # warm caches before the first timed round
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                results[mode].append(measure(llm, mode, batch, args.steps, args.warmup))
            print(f"batch {batch} round {r}: " + ", ".join(f"{m} {results[m][-1]:.2f}" for m in MODES))
        med = {m: statistics.median(v) for m, v in results.items()}
        rows.append((batch, med, results))
    for batch in args.batches:
        wall, cpu = mask_path_ms(llm, batch, 50)
        print(f"guided path alone, batch {batch}: {wall:.2f} ms wall, {cpu:.2f} ms CPU per step")
    print(f"\n{torch.get_num_threads()} threads; medians of {args.rounds} interleaved rounds")
    print("| batch | plain tok/s | json tok/s | json / plain | json, masks after forward tok/s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, med, _ in rows:
        print(
            f"| {batch} | {med['plain']:.2f} | {med['json']:.2f} | {med['json'] / med['plain']:.1%} | "
            f"{med['json-seq']:.2f} | {med['json-seq'] / med['plain']:.1%} |"
        )


if __name__ == "__main__":
    main()
