"""Worker ranks on this machine: start them as `python -m anyquant.workers.main`, watch
them, stop them.

Why not multiprocessing: its spawn start method re-imports the user's main module in every child,
so a script without `if __name__ == "__main__":` recursed into a bootstrap error in each worker
while rank 0 waited for them forever. A fresh interpreter running the package's own entry point
imports nothing of the user's. What rank 0 and the workers share:
- the rendezvous store (rank 0 hosts it; workers get its port on the command line),
- a pipe whose write end only rank 0 holds: a worker exits when it reads end-of-file, so workers
  die with rank 0 however rank 0 ends (SIGKILL included),
- a file-backed array of per-rank collective counters (names the rank that stopped answering),
- each worker's stdout + stderr through a pipe that rank 0 echoes with a rank prefix and keeps the
  last lines of, for the error that reports the worker's death.

Every wait of rank 0 that depends on the workers polls their liveness, so a worker that exits at
any stage fails rank 0 within a fraction of a second with its rank, exit status and last output.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import mmap
import os
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from anyquant.parallel.state import ParallelError

T = TypeVar("T")
log = logging.getLogger(__name__)

# The module every worker runs (`python -m`); tests substitute one that fails on purpose. Named,
# not imported: the worker loop runs a model, so it lives above this package.
WORKER_MODULE = "anyquant.workers.main"
TAIL_LINES = 20
_POLL_S = 0.05


def exit_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerProcess:
    """One worker rank's process and the last lines it wrote."""

    def __init__(self, rank: int, popen: subprocess.Popen[bytes], echo: IO[str] | None) -> None:
        self.rank = rank
        self.popen = popen
        self.pid = popen.pid
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._echo = echo
        self._reader = threading.Thread(target=self._read, name=f"anyquant-tp-rank{rank}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self._tail.append(line)
            if self._echo is not None:
                try:
                    self._echo.write(f"(tp rank {self.rank}) {line}\n")
                    self._echo.flush()
                except (OSError, ValueError):  # the parent's stderr closed (interpreter exit)
                    pass
        stream.close()

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def output_tail(self) -> str:
        """The last lines the worker wrote; complete once it has exited (its pipe then ends)."""
        if not self.is_alive():
            self._reader.join(timeout=2.0)
        return "\n".join(self._tail)

    def describe_exit(self, stage: str = "") -> str:
        """'tensor-parallel rank 1 (pid N) exited with code 3 while loading ...; its last output: ...'"""
        text = f"tensor-parallel rank {self.rank} (pid {self.pid}) {exit_text(self.exitcode)}"
        if stage:
            text += f" {stage}"
        tail = self.output_tail().strip()
        if tail:
            text += "; its last output:\n" + "\n".join(f"  | {line}" for line in tail.splitlines())
        return text

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()  # SIGKILL also ends a stopped (SIGSTOP) process

    def join(self, timeout_s: float) -> bool:
        try:
            self.popen.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            return False
        return True


@dataclasses.dataclass
class LocalWorkers:
    """The worker ranks rank 0 started on this machine; empty when torchrun started the ranks."""

    processes: dict[int, WorkerProcess] = dataclasses.field(default_factory=dict)
    progress: Any = None  # per-rank collective counters shared with the workers (memoryview of int64)
    _parent_alive_fd: int | None = None  # write end of the pipe whose closing ends the workers
    _progress_map: mmap.mmap | None = None

    def dead(self) -> list[WorkerProcess]:
        return [w for _, w in sorted(self.processes.items()) if not w.is_alive()]

    def check(self, stage: str) -> None:
        """Raise `ParallelError` for a worker that has exited (`stage`: what rank 0 was doing)."""
        dead = self.dead()
        if dead:
            raise ParallelError("; ".join(w.describe_exit(stage) for w in dead))

    def wait_until(self, done: Callable[[], bool], stage: str, timeout_s: float) -> None:
        """Poll `done` (non-blocking) until it holds, failing as soon as a worker exits."""
        deadline = time.monotonic() + timeout_s
        while not done():
            self.check(stage)
            if time.monotonic() > deadline:
                raise ParallelError(f"tensor-parallel workers timed out {stage} (after {timeout_s:g} s)")
            time.sleep(_POLL_S)

    def run_watched(self, call: Callable[[], T], stage: str, on_abandon: Callable[[T], None]) -> T:
        """`call()` on a helper thread while this thread watches the workers: a blocking call that
        waits on a peer (a rendezvous, loading while a worker dies) cannot outlive that peer here.
        When a worker exits first, the call is abandoned: it ends on its own timeout, and a result
        it still produces goes to `on_abandon` (e.g. to tear down a group that formed late)."""
        if not self.processes:
            return call()
        lock = threading.Lock()
        outcome: list[tuple[bool, Any]] = []
        abandoned: list[bool] = []

        def run() -> None:
            try:
                result: tuple[bool, Any] = (True, call())
            except BaseException as exc:
                result = (False, exc)
            with lock:
                outcome.append(result)
                late = bool(abandoned)
            if late and result[0]:
                on_abandon(result[1])

        thread = threading.Thread(target=run, name="anyquant-tp-start", daemon=True)
        thread.start()
        try:
            while True:
                thread.join(_POLL_S)
                with lock:
                    if outcome:
                        break
                    if self.dead():
                        abandoned.append(True)
                self.check(stage)
        except BaseException:  # a dead worker, or Ctrl-C while waiting
            with lock:
                unseen = not abandoned  # the call did not know it was abandoned when it ended
                abandoned.append(True)
                if not outcome:
                    _abandoned_starts.append(thread)
            if outcome and unseen and outcome[0][0]:
                on_abandon(outcome[0][1])
            raise
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def stop(self, kill: bool, grace_s: float = 5.0) -> None:
        """End every worker: wait up to `grace_s` for those told to shut down, SIGKILL the rest."""
        deadline = time.monotonic() + (0.0 if kill else grace_s)
        for worker in self.processes.values():
            if not kill:
                worker.join(deadline - time.monotonic())
            worker.kill()
            worker.join(grace_s)
        if self._parent_alive_fd is not None:
            os.close(self._parent_alive_fd)
            self._parent_alive_fd = None

    def pids(self) -> list[int]:
        return [w.pid for _, w in sorted(self.processes.items())]


# A start abandoned after a worker died (or Ctrl-C) may still sit in a rendezvous (until its
# timeout) or be loading; the next start in this process waits for it: two process groups cannot
# form at once, and two copies of the weights need not be in memory together.
_abandoned_starts: list[threading.Thread] = []


def wait_for_abandoned_starts() -> None:
    while _abandoned_starts:
        _abandoned_starts.pop().join()


def _worker_environment() -> dict[str, str]:
    env = dict(os.environ)
    # Idle workers poll the store with a short timeout; c10d logs every expiry as a warning.
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # The worker must import this very `anyquant`, also when the caller found it through a
    # sys.path entry of its own (a checkout, a notebook's path tweak) rather than site-packages.
    root = str(Path(__file__).resolve().parents[2])
    installed = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def start_workers(spec: dict[str, Any], world: int, echo: IO[str] | None = None) -> LocalWorkers:
    """Start ranks 1..world-1, each `python -m WORKER_MODULE <json>` with `spec` plus its rank, the
    file descriptors it inherits and this process's pid. Nothing is waited for here."""
    # The counters live in an unlinked temporary file (nothing to clean up) mapped by every rank.
    with tempfile.TemporaryFile() as counters:
        counters.truncate(8 * world)
        progress_map = mmap.mmap(counters.fileno(), 8 * world)
        alive_read, alive_write = os.pipe()
        workers = LocalWorkers(
            progress=memoryview(progress_map).cast("q"),
            _parent_alive_fd=alive_write,
            _progress_map=progress_map,
        )
        env = _worker_environment()
        try:
            for rank in range(1, world):
                args = {
                    **spec,
                    "rank": rank,
                    "world": world,
                    "parent_pid": os.getpid(),
                    "parent_alive_fd": alive_read,
                    "progress_fd": counters.fileno(),
                }
                popen = subprocess.Popen(
                    [sys.executable, "-m", WORKER_MODULE, json.dumps(args)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=(alive_read, counters.fileno()),
                )
                workers.processes[rank] = WorkerProcess(rank, popen, sys.stderr if echo is None else echo)
                log.info("started tensor-parallel rank %d (pid %d)", rank, popen.pid)
        except BaseException:
            workers.stop(kill=True)
            raise
        finally:
            os.close(alive_read)
    return workers
