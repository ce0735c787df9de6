"""Quantized VLMs on CPU: anyquant against vLLM's CPU backend on the same checkpoints, one run.

For every checkpoint (the real-tool quantized fixtures of tests/fixtures/third_party_vlm/ and the
larger GPTQ int4 checkpoints that benchmarks/vlm_cpu.py builds under out/bench/vlm/), each engine
runs in a fresh process of its own (this file, `--engine NAME`), vLLM first, then anyquant, so the
two figures of a row are minutes apart on the same machine. A child:

- loads the checkpoint (vLLM's offline `LLM`, bf16, eager; anyquant's `LLM`, bf16);
- one warm-up request, then `--reps` times: time to first token of a new 448x448 random image plus
  32 text tokens (max_tokens=1; nothing cached), then decode tokens/s = 32 / (time of 33 tokens -
  time of 1 token), both with that image again (both calls find the same encoder output and prefix
  cached: the difference is the decode steps alone);
- writes the medians, or the exception that stopped it (vLLM's load errors are what this records
  where it cannot read a checkpoint).

The image goes through each checkpoint's own preprocessor_config.json: the tiny fixtures cap images
at 18816 pixels, so 448x448 becomes 112x112, 16 image tokens; the benchmark checkpoints keep it
(Qwen2-VL and InternVL: 256 tokens; mllama: one 560-pixel tile of 1601 patches, one token).

vLLM is not a dependency of this project: it runs from a throw-away venv whose python is named by
ANYQUANT_VLLM_PYTHON (made as in benchmarks/peers_cpu.py):

    ANYQUANT_VLLM_PYTHON=$VENV/bin/python python benchmarks/vlm_vllm_cpu.py [--only SUBSTR ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "third_party_vlm"
TEXT = "Describe the picture in one word."[:32]  # 32 bytes: 32 tokens in every byte-level tokenizer
DECODE = 32
MAX_MODEL_LEN = 2048
CAUSE = re.compile(r"(?:^|\] )((?:\w+\.)*\w+(?:Error|Exception): .*)$", re.MULTILINE)


def _image(seed: int) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))


def _max_len(model: Path) -> int:
    """MAX_MODEL_LEN, or less where the checkpoint's language model has fewer positions."""
    config = json.loads((model / "config.json").read_text())
    text = config.get("text_config") or config.get("llm_config") or config
    return min(MAX_MODEL_LEN, int(text.get("max_position_embeddings", MAX_MODEL_LEN)))


def _family(model: Path) -> str:
    arch = json.loads((model / "config.json").read_text())["architectures"][0]
    return {"InternVLChatModel": "internvl", "MllamaForConditionalGeneration": "mllama"}.get(arch, "qwen2_vl")


# -- children: one engine on one checkpoint -------------------------------------------------------
def _vllm_generate(model: Path) -> Any:
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    llm = LLM(
        str(model), dtype="bfloat16", max_model_len=_max_len(model), max_num_seqs=1,
        limit_mm_per_prompt={"image": 1}, enforce_eager=True, trust_remote_code=True,
    )  # fmt: skip
    marker = {
        "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
        "internvl": "<image>\n",
        "mllama": "<|image|>",
    }[_family(model)]

    def generate(tokens: int, seed: int) -> int:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        request = {"prompt": marker + TEXT, "multi_modal_data": {"image": _image(seed)}}
        out = llm.generate([request], params, use_tqdm=False)
        return len(out[0].prompt_token_ids)

    return generate


def _anyquant_generate(model: Path) -> Any:
    from anyquant import LLM, SamplingParams

    llm = LLM(model, dtype="bfloat16", max_model_len=_max_len(model), kv_cache_gb=1.0)  # = vLLM's
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    family = _family(model)
    if family == "qwen2_vl":
        marker = [ids["<|vision_start|>"], ids["<|image_pad|>"], ids["<|vision_end|>"]]
    elif family == "internvl":
        marker = [ids["<IMG_CONTEXT>"]]  # anyquant expands it to <img> + the tiles' tokens + </img>
    else:
        marker = [ids["<|image|>"]]
    prompt = marker + list(TEXT.encode())  # byte tokens 0..255 are the byte-level ids

    def generate(tokens: int, seed: int) -> int:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        request = {"prompt_token_ids": prompt, "multi_modal_data": {"image": _image(seed)}}
        out = llm.generate([request], params)
        return len(getattr(out[0], "prompt_token_ids", None) or prompt)

    return generate


def measure(engine: str, model: Path, reps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        generate = (_vllm_generate if engine == "vllm" else _anyquant_generate)(model)
    except BaseException as exc:  # the point of the vLLM child: record why it does not load
        return {"loaded": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    result: dict[str, Any] = {"loaded": True, "load_s": time.perf_counter() - t0}
    try:
        result["prompt_tokens"] = generate(1, 10_000)  # warm-up
        ttfts, decodes = [], []
        for rep in range(reps):
            t0 = time.perf_counter()
            generate(1, rep)  # a new image: nothing cached
            ttfts.append(time.perf_counter() - t0)
            # The same image again, 1 and 1 + DECODE tokens: both find the same encoder output and
            # prefix cached, so the difference is the decode steps alone.
            t0 = time.perf_counter()
            generate(1, rep)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            generate(1 + DECODE, rep)
            decodes.append(DECODE / max(time.perf_counter() - t0 - first, 1e-9))
        result.update(ttft_s=statistics.median(ttfts), decode_tok_s=statistics.median(decodes))
    except BaseException as exc:
        result.update(error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    return result


# -- parent ---------------------------------------------------------------------------------------
def _run_child(engine: str, python: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, __file__, "--engine", engine, "--model", str(model), "--reps", str(args.reps)]
        try:
            done = subprocess.run(
                [*cmd, "--out", str(out)], capture_output=True, text=True, env=env,
                timeout=args.timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"loaded": False, "error": f"no result within {args.timeout} s"}
        if not out.exists():
            return {"loaded": False, "error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
        result = dict(json.loads(out.read_text()))
        if not result.get("loaded"):
            # vLLM inspects a model class in a subprocess and raises a generic error: the cause is
            # in its log, as the last exception line there.
            lines = [m.group(1) for m in CAUSE.finditer(done.stdout + done.stderr)]
            causes = [line for line in lines if line.split(": ", 1)[1] not in result["error"]]
            if causes:
                result["cause"] = causes[-1]
        return result


def _checkpoints(args: argparse.Namespace) -> list[Path]:
    paths = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())
    if args.bench:
        spec = importlib.util.spec_from_file_location("vlm_cpu", Path(__file__).with_name("vlm_cpu.py"))
        assert spec is not None and spec.loader is not None
        vlm_cpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vlm_cpu)
        paths += [p.resolve() for p in vlm_cpu.quantized_checkpoints(args.bench)]
    if args.only:
        paths = [p for p in paths if any(s in p.name for s in args.only)]
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["anyquant", "vllm"], help="(internal) measure one engine")
    parser.add_argument("--model", type=Path, help="(internal) the checkpoint")
    parser.add_argument("--out", type=Path, help="(internal) where the child writes its JSON")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="checkpoints whose folder name contains one of these")
    parser.add_argument(
        "--bench", nargs="*", default=["qwen2_vl", "internvl", "mllama"],
        help="benchmark families of vlm_cpu.py to build and include (none: fixtures only)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.engine:  # child: its JSON goes to a file (both engines print on stdout)
        args.out.write_text(json.dumps(measure(args.engine, args.model, args.reps)))
        return
    vllm_python = os.environ.get("ANYQUANT_VLLM_PYTHON", "")
    if not vllm_python:
        raise SystemExit("set ANYQUANT_VLLM_PYTHON to the python of a vllm-cpu venv")
    rows = []
    for model in _checkpoints(args):
        row = {"checkpoint": model.name}
        for engine, python in (("vllm", vllm_python), ("anyquant", sys.executable)):
            row[engine] = _run_child(engine, python, model, args)
            row[engine].pop("trace", None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| checkpoint | vLLM loads | vLLM TTFT | anyquant TTFT | vLLM decode | anyquant decode |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        v, a = row["vllm"], row["anyquant"]

        def cell(r: dict[str, Any], key: str, unit: str) -> str:
            return f"{r[key]:.2f} {unit}" if key in r else "-"

        loads = "yes" if v.get("loaded") else f"no: {v.get('cause') or v.get('error', '')[:160]}"
        print(
            f"| {row['checkpoint']} | {loads} | {cell(v, 'ttft_s', 's')} | {cell(a, 'ttft_s', 's')} "
            f"| {cell(v, 'decode_tok_s', 'tok/s')} | {cell(a, 'decode_tok_s', 'tok/s')} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
