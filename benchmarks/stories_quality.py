"""What quantization costs on a real trained model: stories260K perplexity per format.

Quantizes ../shared/models/stories260K/hf with `anyquant quantize` in several formats and measures
perplexity on the held-out protocol of ../shared/models/stories260K/expected_outputs.json (the
reference's own fp32 / int8 / int4 numbers are printed beside ours).

    python benchmarks/stories_quality.py [--lm-head-only | --kv-cache-only]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from anyquant import LLM
from anyquant.bench.evaluate import corpus_perplexity
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.quant.formats.base import WriteOptions

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "stories260K"
CASES = [
    ("fp32 (unquantized)", None, WriteOptions()),
    ("GPTQ int8 per-channel sym", "gptq", WriteOptions(bits=8, group_size=-1, sym=True)),
    ("GPTQ int4 per-channel sym", "gptq", WriteOptions(bits=4, group_size=-1, sym=True)),
    (
        "compressed-tensors W8A16 (int8 g32)",
        "compressed-tensors",
        WriteOptions(scheme="W8A16", group_size=32),
    ),
    (
        "compressed-tensors W4A16 (int4 g32)",
        "compressed-tensors",
        WriteOptions(scheme="W4A16", group_size=32),
    ),
    (
        "compressed-tensors W4A16_ASYM (int4 g32)",
        "compressed-tensors",
        WriteOptions(scheme="W4A16_ASYM", group_size=32),
    ),
    ("compressed-tensors W8A8 (int8, dyn. int8 acts)", "compressed-tensors", WriteOptions(scheme="W8A8")),
    ("compressed-tensors FP8_DYNAMIC", "compressed-tensors", WriteOptions(scheme="FP8_DYNAMIC")),
    ("lmdeploy smooth_quant int8 (W8A8)", "lmdeploy-int8", WriteOptions()),
    ("FP8 block 32x32 (dyn. fp8 acts)", "fp8-block", WriteOptions(block_size=(32, 32))),
]


def main() -> None:
    if "--lm-head-only" in sys.argv or "--kv-cache-only" in sys.argv:
        expected = json.loads((STORIES / "expected_outputs.json").read_text())["perplexity_reference"]
        text = (STORIES / expected["file"]).read_text()
        if "--lm-head-only" in sys.argv:
            lm_head_costs(text)
        else:
            kv_cache_costs(text)
        return
    expected = json.loads((STORIES / "expected_outputs.json").read_text())["perplexity_reference"]
    text = (STORIES / expected["file"]).read_text()
    print(
        f"reference: fp32 {expected['fp32_perplexity']}, int8 per-row {expected['int8_rtn_per_row_linear_only_perplexity']}, "
        f"int4 per-row {expected['int4_rtn_per_row_linear_only_perplexity']}"
    )
    print("| model | layers quantized | perplexity |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, fmt, options in CASES:
            path = STORIES / "hf"
            quantized = "0 / 35"
            if fmt is not None:
                path = Path(tmp) / label.replace(" ", "_")
                report = quantize_checkpoint(STORIES / "hf", path, fmt, options)
                n = sum(r.rel_error is not None for r in report.layers)
                quantized = f"{n} / {len(report.layers)}"
            ppl = corpus_perplexity(LLM(path, dtype="float32"), text)
            print(f"| {label} | {quantized} | {ppl.perplexity:.4f} |")
    lm_head_costs(text)


def lm_head_costs(text: str) -> None:
    """What the opt-in int8 and int4 LM heads (--lm-head-dtype) cost, per compute dtype and with
    the body quantized (W4A16 g32) or not. stories260K ties its head to the embedding table: the
    head is quantized, the embedding lookup stays as stored."""
    print("\n| body | compute dtype | LM head | perplexity | vs as stored |")
    print("|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        w4 = Path(tmp) / "w4a16"
        quantize_checkpoint(
            STORIES / "hf", w4, "compressed-tensors", WriteOptions(scheme="W4A16", group_size=32)
        )
        for body, path in (("unquantized", STORIES / "hf"), ("W4A16 g32", w4)):
            for dtype in ("float32", "bfloat16"):
                base = corpus_perplexity(LLM(path, dtype=dtype), text).perplexity
                print(f"| {body} | {dtype} | as stored | {base:.4f} | |")
                for head in ("int8", "int4"):
                    llm = LLM(path, dtype=dtype, lm_head_dtype=head)
                    spec = llm.loaded.model.lm_head.kernel.spec.describe()
                    ppl = corpus_perplexity(llm, text).perplexity
                    print(f"| {body} | {dtype} | {head}: {spec} | {ppl:.4f} | {ppl / base - 1:+.2%} |")


def kv_cache_costs(text: str) -> None:
    """What the opt-in int8 KV cache (--kv-cache-dtype int8) costs, per compute dtype and with the
    body quantized (W4A16 g32) or not: every layer's keys and values are stored as int8 rows and
    read back dequantized (the logits' teacher-forced pass goes through the same cache)."""
    print("\n| body | compute dtype | KV cache | bytes / token | perplexity | vs the compute-dtype cache |")
    print("|---|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        w4 = Path(tmp) / "w4a16"
        quantize_checkpoint(
            STORIES / "hf", w4, "compressed-tensors", WriteOptions(scheme="W4A16", group_size=32)
        )
        for body, path in (("unquantized", STORIES / "hf"), ("W4A16 g32", w4)):
            for dtype in ("float32", "bfloat16"):
                base = None
                for kv in ("auto", "int8"):
                    llm = LLM(path, dtype=dtype, kv_cache_dtype=kv, enforce_eager=True)
                    per_token = PagedKVCache.page_bytes_for_model(llm.model, 1, llm.cache_dtype)
                    ppl = corpus_perplexity(llm, text).perplexity
                    base = base or ppl
                    name = str(llm.cache_dtype).removeprefix("torch.")
                    cost = "" if kv == "auto" else f"{ppl / base - 1:+.3%}"
                    print(f"| {body} | {dtype} | {name} | {per_token} | {ppl:.4f} | {cost} |")


if __name__ == "__main__":
    main()
