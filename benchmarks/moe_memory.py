"""Resident memory of loading and serving a quantized MoE checkpoint, against its weight bytes.

Default mode: loads the checkpoint in a fresh process (`anyquant.LLM`, bfloat16), then runs a
prefill and a few decode steps, and reports, from /proc/self/status: the peak resident set (VmHWM)
and, after loading and after serving, the resident set split into anonymous memory (what the
process allocated: repacked weights, caches, temporaries) and file pages (mapped checkpoint
files). The target is anonymous memory about the size of the checkpoint's tensors, with no
dequantized copies of experts at any point.

    python benchmarks/moe_memory.py out/bench/qwen3moe-a3b-3l-w4a16 [--prompt-len 512]

`--serve`: starts `anyquant serve` on the checkpoint with a fixed KV cache budget (`--kv-cache-gb`),
streams the closed-loop load of `anyquant bench serve` at each concurrency level (default 1, 8 and
32 clients, 128-token prompts, `--max-tokens` outputs) and samples the server's /proc/PID/status
every 50 ms. Per level it reports the largest resident set seen while serving against the issue's
bound, 1.2 x the checkpoint's tensor bytes + the KV cache budget (the server logs the budget it
allocated), split into anonymous memory and file pages (the token embedding is read from the
checkpoint's memory map: its pages count once each token's rows were read), and what the server
keeps once the level is over. A checkpoint without a tokenizer gets the benchmark one (benchmarks/llamacpp_baseline.py).

    python benchmarks/moe_memory.py out/bench/qwen3moe-a3b-3l-w4a16 --serve [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
from pathlib import Path


def status_mib(pid: int | str = "self") -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
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


class PeakSampler:
    """The largest VmRSS / RssAnon of a process, sampled on a thread while the context runs."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            now = status_mib(self.pid)
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def serve(args: argparse.Namespace, weight_mib: float) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import llamacpp_baseline

    from anyquant.bench.serve import ServerProcess, anyquant_server_command, free_port, make_prompts, run_load

    model = Path(args.model)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    if not (model / "tokenizer.json").exists():
        llamacpp_baseline.ensure_tokenizer([model], vocab)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--dtype", "bfloat16", "--kv-cache-gb", str(args.kv_cache_gb)]
    extra += ["--max-model-len", str(args.prompt_len + args.max_tokens)]
    command = anyquant_server_command(model, port, max(args.concurrency), extra)
    log = Path(args.log_dir) / "moe-memory-serve.log"
    rows = []
    with ServerProcess(command, url, "anyquant serve", log, startup_timeout_s=args.startup_timeout) as server:
        assert server.pid is not None
        loaded = status_mib(server.pid)
        found = re.search(r"KV cache: \d+ pages of \d+ tokens \(([\d.]+) MiB\)", log.read_text())
        kv_mib = float(found.group(1)) if found else args.kv_cache_gb * 1024
        for clients in args.concurrency:
            prompts = make_prompts(max(clients, 4), args.prompt_len, (100, vocab - 16), seed=7 + clients)
            with PeakSampler(server.pid) as sampler:
                asyncio.run(run_load(url, "anyquant serve", prompts, clients, args.max_tokens))
            idle = status_mib(server.pid)  # between levels: what the server keeps
            rows.append(
                (clients, sampler.peak["VmRSS"], sampler.peak["RssAnon"], sampler.peak["RssFile"], idle)
            )
        hwm = status_mib(server.pid)["VmHWM"]
    bound = 1.2 * weight_mib + kv_mib
    print(f"checkpoint tensors {weight_mib:.0f} MiB, KV cache budget {kv_mib:.0f} MiB (server log), ")
    print(f"bound 1.2 x tensors + KV = {bound:.0f} MiB; after load: RSS {loaded['VmRSS']:.0f} MiB")
    print(
        f"(anonymous {loaded['RssAnon']:.0f}, file pages {loaded['RssFile']:.0f}); peak of the process {hwm:.0f}\n"
    )
    print(
        "| clients | max RSS while serving, MiB | max anonymous | max file pages | RSS / bound "
        "| RSS after the level | anonymous after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for clients, rss, anon, file_pages, idle in rows:
        print(
            f"| {clients} | {rss:.0f} | {anon:.0f} | {file_pages:.0f} | {rss / bound:.2f} "
            f"| {idle['VmRSS']:.0f} | {idle['RssAnon']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 512 (128 with --serve)")
    parser.add_argument("--decode-len", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help="measure `anyquant serve` under load")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=32, help="--serve: output tokens per request")
    parser.add_argument("--kv-cache-gb", type=float, default=0.25, help="--serve: the server's KV budget")
    parser.add_argument("--log-dir", default="out/bench/logs")
    parser.add_argument(
        "--startup-timeout", type=float, default=1800.0, help="--serve: seconds to wait for the server (load)"
    )
    args = parser.parse_args()
    if args.prompt_len is None:
        args.prompt_len = 128 if args.serve else 512
    if args.child:
        return child(args.model, args.prompt_len, args.decode_len)
    files = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    if args.serve:
        return serve(args, files / 2**20)
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
