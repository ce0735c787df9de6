"""Resident memory of loading and serving a quantized MoE checkpoint, against its weight bytes.

Loads the checkpoint in a fresh process (`anyquant.LLM`, bfloat16), then runs a prefill and a few
decode steps, and reports, from /proc/self/status: the peak resident set (VmHWM) and, after
loading and after serving, the resident set split into anonymous memory (what the process
allocated: repacked weights, caches, temporaries) and file pages (mapped checkpoint files). The
target is anonymous memory about the size of the checkpoint's tensors, with no dequantized copies
of experts at any point.

    python benchmarks/moe_memory.py out/bench/qwen3moe-a3b-3l-w4a16 [--prompt-len 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def status_mib() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def child(model: str, prompt_len: int, decode_len: int) -> None:
    import torch

    from anyquant.engine.kv_cache import SequenceCache
    from anyquant.llm import LLM

    start = status_mib()
    llm = LLM(model, dtype="bfloat16")
    loaded = status_mib()
    seq = SequenceCache(llm.model, prompt_len + decode_len + 1, llm.dtype, llm.device)
    prompt = torch.randint(0, 1000, (prompt_len,)).tolist()
    token = int(seq.forward(prompt, 0, torch.tensor([prompt_len - 1]))[-1].argmax())
    for i in range(decode_len):
        token = int(seq.forward([token], prompt_len + i)[-1].argmax())
    served = status_mib()
    print(json.dumps({"start": start, "loaded": loaded, "served": served}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.model, args.prompt_len, args.decode_len)
    files = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    cmd = [sys.executable, __file__, args.model, "--child", "--prompt-len", str(args.prompt_len)]
    cmd += ["--decode-len", str(args.decode_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out[out.index("{") :])
    print(f"checkpoint tensors: {files / 2**20:.0f} MiB")
    print("| point | VmHWM (peak) | RSS | anonymous | file pages |")
    print("|---|---:|---:|---:|---:|")
    for point in ("start", "loaded", "served"):
        s = r[point]
        print(f"| {point} | {s['VmHWM']:.0f} | {s['VmRSS']:.0f} | {s['RssAnon']:.0f} | {s['RssFile']:.0f} |")


if __name__ == "__main__":
    main()
