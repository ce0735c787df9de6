"""`anyquant serve` as users run it: flags, load-phase log lines, auth, and SIGTERM draining."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from anyquant.cli.main import build_parser, main
from tests.server.conftest import MODEL


def test_tensor_parallel_size_below_one_is_a_clear_error(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tiny_model), "--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size 0: must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(tiny_model), "--kv-cache-fraction", "1.5"]) == 2
    assert "--kv-cache-fraction 1.5: must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_with_two_tensor_parallel_ranks_answers_like_one_process(tiny_model: Path) -> None:
    from anyquant import LLM, SamplingParams

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "anyquant",
        "serve",
        str(tiny_model),
        "--port",
        str(port),
        "--tp",
        "2",
        "--dtype",
        "float32",
        "--served-model-name",
        MODEL,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "server did not become healthy in 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {
            "model": MODEL,
            "prompt": [256, 10, 20, 30],
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
        }
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    alone = LLM(tiny_model, dtype="float32").generate(
        prompt_token_ids=[[256, 10, 20, 30]],
        sampling_params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    )[0]
    assert reply["choices"][0]["text"] == alone.text
    assert reply["usage"]["completion_tokens"] == 12


def test_serve_help_lists_the_vllm_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--served-model-name", "--max-model-len", "--max-num-seqs", "--dtype"):
        assert flag in out
    for flag in ("--tensor-parallel-size", "--api-key", "--kv-cache-gb"):
        assert flag in out
    args = build_parser().parse_args(["serve", "some/model"])
    assert args.host == "127.0.0.1"  # loopback unless asked otherwise
    assert args.tensor_parallel_size == 1 and args.api_key is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_logs_phases_and_drains_in_flight_streams_on_sigterm(tiny_model: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "anyquant", "serve", str(tiny_model), "--port", str(port)]
    cmd += [
        "--served-model-name",
        MODEL,
        "--dtype",
        "float32",
        "--api-key",
        "k3y",
        "--shutdown-timeout",
        "30",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "server did not become healthy in 60 s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a"}).status_code == 401
        headers = {"Authorization": "Bearer k3y"}
        body = {"model": MODEL, "prompt": "a", "max_tokens": 240, "stream": True, "ignore_eos": True}
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    # The in-flight stream ran to its end: every token, a finish reason, then [DONE].
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
        "length"
    ]
    for phase in ("phase reading", "phase repacking", "phase KV cache", "phase warm-up"):
        assert phase in log, log
    assert f"on http://127.0.0.1:{port}" in log and "shut down cleanly" in log


def test_the_cli_does_not_import_the_server_stack_until_serve_runs() -> None:
    code = (
        "import sys, anyquant, anyquant.cli.main as m; m.build_parser(); "
        "heavy = {'fastapi', 'uvicorn', 'prometheus_client', 'anyquant.server'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
