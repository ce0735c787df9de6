"""Peak memory of `anyquant quantize` against the size of its input and of its largest layer.

Writes a random bf16 Llama of a few hundred MB (decoder layers dominate by default; a large
--vocab makes the embedding and LM head the largest tensors), quantizes it in a subprocess and samples that process's resident
memory (anonymous and file-backed separately) every 5 ms; also reports the kernel's maximum RSS.

    python benchmarks/quantize_memory.py [--format gptq] [--hidden 1024] [--layers 16] [--vocab 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open


def _status(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of `pid` in bytes (empty once it has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def measure(argv: list[str], cwd: Path) -> dict[str, int]:
    """Peak memory of `argv`: the kernel's maximum RSS of that process alone (os.wait4), and
    samples of its anonymous / file-backed split. Runs in `cwd` so that `-m anyquant` imports the
    tree on PYTHONPATH, not the current directory's."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    peak: dict[str, int] = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for key, value in _status(proc.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv} failed with exit code {proc.returncode}")
    peak["ru_maxrss"] = usage.ru_maxrss * 1024
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", default="gptq")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        # Written by a child process: this one stays small, so the quantize child it forks starts
        # small (a child's maximum RSS includes what it inherited at fork).
        sizes_kw = dict(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 256,
            head_dim=64,
            vocab_size=args.vocab,
            torch_dtype="bfloat16",
        )
        code = (
            "import sys, json; from anyquant.utils.tiny_model import write_tiny_model; "
            "write_tiny_model(sys.argv[1], 'llama', **json.loads(sys.argv[2]))"
        )
        subprocess.run([sys.executable, "-c", code, str(src), json.dumps(sizes_kw)], check=True)
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            sizes = {n: f.get_slice(n).get_shape() for n in f.keys()}  # noqa: SIM118
        input_bytes = (src / "model.safetensors").stat().st_size
        largest = max(sizes, key=lambda n: _numel(sizes[n]))
        layer0 = sum(2 * _numel(s) for n, s in sizes.items() if n.startswith("model.layers.0."))
        dst = Path(tmp) / "dst"
        argv = [sys.executable, "-m", "anyquant", "quantize", str(src), str(dst), "--format", args.format]
        peak = measure(argv, Path(tmp))
        output_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    mib = 2**20
    print(
        f"input {input_bytes / mib:.0f} MiB bf16 ({len(sizes)} tensors), output {output_bytes / mib:.0f} MiB"
    )
    print(
        f"largest tensor {largest} {sizes[largest]}: {2 * _numel(sizes[largest]) / mib:.0f} MiB; decoder layer {layer0 / mib:.0f} MiB"
    )
    print(
        f"peak RSS {peak['VmRSS'] / mib:.0f} MiB (anonymous {peak['RssAnon'] / mib:.0f} MiB, "
        f"file-backed {peak['RssFile'] / mib:.0f} MiB; sampled every 5 ms), kernel max RSS "
        f"{peak['ru_maxrss'] / mib:.0f} MiB"
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
