"""The same GGUF files in anyquant and in llama.cpp: prompt processing, batch-1 decode, batch 32.

A random-weight Qwen2.5-0.5B-shaped model (benchmarks/decode_cpu.py's geometry) is converted to
F16 GGUF by llama.cpp's convert_hf_to_gguf.py and quantized by llama-quantize to Q4_0 and Q4_K_M;
both engines then load those exact files. llama.cpp is measured by its own tools (llama-bench:
pp512 and tg32; llama-batched-bench: 32 sequences), anyquant by `bench_offline` (prefill 512,
decode 32) and one `LLM.generate` of 32 prompts, alternating engine by engine in one run (the
machine is shared: compare only numbers of the same run). Needs the throw-away llama.cpp build
of benchmarks/llamacpp_baseline.py (ANYQUANT_LLAMACPP_BIN with llama-quantize, llama-bench,
llama-batched-bench and the source tree).

    python benchmarks/gguf_vs_llamacpp.py prepare      # out/bench/gguf/*.gguf
    python benchmarks/gguf_vs_llamacpp.py run --threads 2 > out/bench/gguf/results.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import llamacpp_baseline as lcpp  # noqa: E402
from benchmarks.decode_cpu import DENSE  # noqa: E402

OUT = Path("out/bench/gguf")
TYPES = ("Q4_0", "Q4_K_M")
PP, TG, BATCH, BATCH_PROMPT = 512, 32, 32, 64

_CONVERT = """
import sys
source, model_dir, outfile = sys.argv[1:4]
sys.path[:0] = [source, source + "/gguf-py"]
import conversion
def no_sentencepiece(self):  # there is no tokenizer.model: go straight to the BPE vocabulary
    raise FileNotFoundError("tokenizer.model")
conversion.TextModel._set_vocab_sentencepiece = no_sentencepiece
conversion.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", "f16"]
convert_hf_to_gguf.main()
"""


def _run(cmd: list[str]) -> str:
    print("+", " ".join(cmd)[:240], file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def prepare() -> None:
    import torch
    import transformers

    dense = OUT / "dense-bf16"
    if not (dense / "config.json").exists():
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(
            DENSE["model_type"], **{k: v for k, v in DENSE.items() if k != "model_type"}
        )
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(dense)
        lcpp.ensure_tokenizer([dense], DENSE["vocab_size"])
    f16 = OUT / "dense-F16.gguf"
    if not f16.exists():
        _run([sys.executable, "-c", _CONVERT, str(lcpp.bin_dir() / "llama.cpp"), str(dense), str(f16)])
    for kind in TYPES:
        target = OUT / f"dense-{kind}.gguf"
        if not target.exists():
            _run([str(lcpp.bin_dir() / "llama-quantize"), str(f16), str(target), kind, "2"])


def llamacpp(gguf: Path, threads: int) -> dict[str, float]:
    bench = json.loads(
        _run([str(lcpp.bin_dir() / "llama-bench"), "-m", str(gguf), "-p", str(PP), "-n", str(TG),
              "-t", str(threads), "-r", "2", "-o", "json"])
    )  # fmt: skip
    rates = {("pp" if r["n_prompt"] else "tg"): float(r["avg_ts"]) for r in bench}
    table = _run(
        [str(lcpp.bin_dir() / "llama-batched-bench"), "-m", str(gguf), "-c", str(BATCH * (BATCH_PROMPT + TG)),
         "-b", "2048", "-ub", "512", "-npp", str(BATCH_PROMPT), "-ntg", str(TG), "-npl", str(BATCH),
         "-t", str(threads)]
    )  # fmt: skip
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    row = next(
        line for line in table.splitlines() if re.match(rf"\|\s+{BATCH_PROMPT}\s+\|\s+{TG}\s+\|", line)
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    return {"pp512_tok_s": rates["pp"], "decode_b1_tok_s": rates["tg"], "decode_b32_tok_s": float(cells[7])}


def anyquant(gguf: Path) -> dict[str, float]:
    import torch

    from anyquant import LLM, SamplingParams
    from anyquant.bench.offline import bench_offline

    offline = bench_offline(str(gguf), prompt_len=PP, decode_len=TG, repeats=2)
    llm = LLM(str(gguf), max_num_seqs=BATCH)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 150000, (BATCH_PROMPT,), generator=g).tolist() for _ in range(BATCH)]
    params = SamplingParams(max_tokens=TG, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outs)
    return {
        "pp512_tok_s": offline.prefill_tok_s,
        "decode_b1_tok_s": offline.decode_tok_s,
        # prefill of the 32 prompts included, as in llama-batched-bench's total; S_TG is reported
        # separately there, so this is a lower bound of the comparable figure
        "batch32_total_tok_s": (generated + BATCH * BATCH_PROMPT) / seconds,
        "batch32_generated_tok_s": generated / seconds,
        "load_s": offline.load_s,
    }


def run(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    results: dict[str, Any] = {
        "threads": threads,
        "pp": PP,
        "tg": TG,
        "batch": BATCH,
        "batch_prompt": BATCH_PROMPT,
    }
    for kind in TYPES:
        gguf = OUT / f"dense-{kind}.gguf"
        results[kind] = {"llama.cpp": llamacpp(gguf, threads), "anyquant": anyquant(gguf)}
        print(json.dumps({kind: results[kind]}), file=sys.stderr)
    print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    prepare() if args.cmd == "prepare" else run(args.threads)


if __name__ == "__main__":
    main()
