"""`anyquant serve` as users run it: flags, load-phase log lines, auth, and SIGTERM draining."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from anyquant.bench.serve import ServerProcess, free_port
from anyquant.cli.main import build_parser, main
from tests.server.conftest import MODEL


def test_tensor_parallel_size_below_one_is_a_clear_error(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tiny_model), "--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size 0: must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(tiny_model), "--kv-cache-fraction", "1.5"]) == 2
    assert "--kv-cache-fraction 1.5: must be in (0, 1]" in capsys.readouterr().err
    assert main(["serve", str(tiny_model), "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice needs --tool-call-parser" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_with_two_tensor_parallel_ranks_answers_like_one_process(
    tiny_model: Path, tmp_path: Path
) -> None:
    from anyquant import LLM, SamplingParams

    port = free_port()
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
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with ServerProcess(cmd, url, "anyquant serve --tp 2", log, env={"OMP_NUM_THREADS": "1"}):
        body = {
            "model": MODEL,
            "prompt": [256, 10, 20, 30],
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
        }
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
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
    for flag in (
        "--tool-call-parser",
        "--enable-auto-tool-choice",
        "--chat-template",
        "--trust-request-chat-template",
    ):
        assert flag in out
    args = build_parser().parse_args(["serve", "some/model"])
    assert args.host == "127.0.0.1"  # loopback unless asked otherwise
    assert args.tensor_parallel_size == 1 and args.api_key is None


@pytest.mark.slow
def test_serve_logs_phases_and_drains_in_flight_streams_on_sigterm(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
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
    log_path = tmp_path / "serve.log"
    server = ServerProcess(cmd, url, "anyquant serve", log_path, env={"PYTHONUNBUFFERED": "1"})
    with server:
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
        assert server.stop(timeout_s=60) == 0  # SIGTERM: drain, then exit cleanly
        reader.join(60)
    log = log_path.read_text()
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


@pytest.mark.slow
def test_serve_tool_and_template_flags_reach_the_server(tiny_model: Path, tmp_path: Path) -> None:
    template = tmp_path / "mine.jinja"
    template.write_text(
        "{% for m in messages %}({{ m.content }}){% endfor %}{{ tools | length if tools else 0 }}"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "anyquant",
        "serve",
        str(tiny_model),
        "--port",
        str(port),
        "--dtype",
        "float32",
    ]
    cmd += ["--served-model-name", MODEL, "--chat-template", str(template), "--tool-call-parser", "hermes"]
    cmd += ["--enable-auto-tool-choice"]
    with ServerProcess(cmd, url, "anyquant serve", tmp_path / "serve.log"):
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        messages = [{"role": "user", "content": "hi"}]
        tokens = httpx.post(f"{url}/tokenize", json={"messages": messages, "tools": tools}).json()
        detok = httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert detok["prompt"] == "(hi)1"  # the --chat-template file rendered it
        body = {"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 3}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text  # tool_choice auto: the parser is configured
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
