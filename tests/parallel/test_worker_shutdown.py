"""`serve --tp 2` ends with no process left behind, however it is stopped, and the same command
under torchrun on two "nodes" (two torchrun invocations on loopback) serves a request."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from anyquant import LLM, SamplingParams
from anyquant.bench.serve import ServerProcess, free_port
from tests.parallel._procs import parent_of, running, subprocess_env, wait_gone

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]
PROMPT = [256, 10, 20, 30]


def serve_args(model: Path, port: int) -> list[str]:
    return ["-m", "anyquant", "serve", str(model), "--tp", "2", "--port", str(port), "--dtype", "float32"]


def worker_pids(log: Path) -> list[int]:
    """The worker ranks' pids, from the server's log ('started tensor-parallel rank 1 (pid N)')."""
    return [int(p) for p in re.findall(r"started tensor-parallel rank \d+ \(pid (\d+)\)", log.read_text())]


def complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


def test_sigterm_drains_and_ends_the_workers(tp_model: Callable[[str], Path], tmp_path: Path) -> None:
    model, port, log = tp_model("llama"), free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        [sys.executable, *serve_args(model, port)], url, "serve --tp 2", log, env=subprocess_env()
    )
    with server:
        (worker,) = worker_pids(log)
        assert running(worker)
        complete(url, str(model))
        assert server.stop() == 0  # SIGTERM: uvicorn drains, the engine stops, then the workers
    assert wait_gone([worker], 10.0) == []
    assert "shut down cleanly" in log.read_text()


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_sigkill_of_the_server_ends_the_workers(
    tp_model: Callable[[str], Path], tmp_path: Path, when: str
) -> None:
    """Rank 0 gets no chance to clean up: its workers see their liveness pipe close and exit, also
    one still starting (importing, loading), which has no connection to rank 0 yet to lose."""
    model, port, log = tp_model("llama"), free_port(), tmp_path / "serve.log"
    if when == "serving":
        url = f"http://127.0.0.1:{port}"
        with ServerProcess(
            [sys.executable, *serve_args(model, port)], url, "serve --tp 2", log, env=subprocess_env()
        ):
            (worker,) = worker_pids(log)
            os.kill(parent_of(worker), signal.SIGKILL)
            assert wait_gone([worker], 10.0) == []
        return
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, *serve_args(model, port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
    try:
        deadline = time.monotonic() + 120
        while not worker_pids(log) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        (worker,) = worker_pids(log)
        server.kill()
        assert wait_gone([worker], 10.0) == []
    finally:
        server.kill()
        server.wait()


def test_two_torchrun_nodes_serve_a_request(tp_model: Callable[[str], Path], tmp_path: Path) -> None:
    """The multi-machine command of the README, both "machines" on loopback: node 0's rank serves
    HTTP and drives node 1's rank, which answers like one process; SIGTERM to node 0's torchrun
    stops both nodes."""
    model, http, master = tp_model("llama"), free_port(), free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(master)]
    url, env = f"http://127.0.0.1:{http}", subprocess_env()
    with (tmp_path / "node1.log").open("wb") as node1_log:
        node1 = subprocess.Popen(
            [*torchrun, "--node-rank", "1", *serve_args(model, http)],
            stdout=node1_log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        node0_log = tmp_path / "node0.log"
        with ServerProcess(
            [*torchrun, "--node-rank", "0", *serve_args(model, http)],
            url,
            "torchrun node 0",
            node0_log,
            env=env,
        ) as node0:
            text = complete(url, str(model))
            node0.stop()
        node1.wait(timeout=60)  # rank 1 was told to shut down by rank 0
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    assert "shut down cleanly" in node0_log.read_text()
    alone = LLM(model, dtype="float32").generate(
        prompt_token_ids=[PROMPT],
        sampling_params=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
    )[0]
    assert text == alone.text
