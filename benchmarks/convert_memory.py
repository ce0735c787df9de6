"""Peak memory of `anyquant convert` against its input, its largest layer and two baselines.

Writes a random bf16 Llama, quantizes it (GPTQ 4-bit g128 sym) in a child process, then measures,
in the same run: a process that only imports torch and the converter (the floor), `anyquant
quantize` of the dense model (the streaming baseline), and `anyquant convert` to compressed-tensors
with and without `--pad-for-tp 2`. Peak RSS per process via os.wait4 (see quantize_memory.py).

    python benchmarks/convert_memory.py [--hidden 1024] [--intermediate 4096] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_memory import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense, gptq = root / "dense", root / "gptq"
        sizes_kw = dict(
            hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256, head_dim=64,
            vocab_size=args.vocab, torch_dtype="bfloat16",
        )  # fmt: skip
        code = (
            "import sys, json; from anyquant.utils.tiny_model import write_tiny_model; "
            "write_tiny_model(sys.argv[1], 'llama', **json.loads(sys.argv[2]))"
        )
        subprocess.run([sys.executable, "-c", code, str(dense), json.dumps(sizes_kw)], check=True)
        quantize = [sys.executable, "-m", "anyquant", "quantize", str(dense), str(gptq), "--format", "gptq",
                    "--bits", "4", "--group-size", "128", "--sym"]  # fmt: skip
        runs = {"quantize (dense -> gptq)": measure(quantize, root)}
        floor = [sys.executable, "-c", "import torch, anyquant.convert.converter"]
        runs["import only"] = measure(floor, root)
        for name, extra in (
            ("convert gptq -> ct", []),
            ("convert gptq -> ct --pad-for-tp 2", ["--pad-for-tp", "2"]),
        ):
            dst = root / name.replace(" ", "_")
            argv = [sys.executable, "-m", "anyquant", "convert", str(gptq), str(dst), "--format",
                    "compressed-tensors", *extra]  # fmt: skip
            runs[name] = measure(argv, root)
        dense_bytes = (dense / "model.safetensors").stat().st_size
        gptq_bytes = sum(p.stat().st_size for p in gptq.glob("*.safetensors"))
    # The largest quantized layer held in canonical form: one code byte per weight plus fp32 scales.
    n, k = args.intermediate, args.hidden
    layer = n * k + 4 * n * (k // 128) + 4 * n * (k // 128)
    print(f"dense input {dense_bytes / mib:.0f} MiB bf16; gptq input {gptq_bytes / mib:.0f} MiB")
    print(f"largest layer [{n}, {k}] in canonical form: {layer / mib:.1f} MiB")
    for name, peak in runs.items():
        print(f"{name:40s} peak RSS {peak['ru_maxrss'] / mib:6.0f} MiB (sampled: anonymous "
              f"{peak['RssAnon'] / mib:.0f}, file-backed {peak['RssFile'] / mib:.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
