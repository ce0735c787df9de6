"""`python -m anyquant.workers.main SPEC`: one worker rank started by `parallel/launch.py`.

SPEC is one JSON object: the `LoadRequest` fields, rank, world, the store's address and port, the
pid of rank 0 and two inherited file descriptors (the read end of rank 0's liveness pipe, the
shared collective counters). This module imports only the standard library until rank 0's
liveness is watched, so a worker never outlives rank 0, even while importing torch.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import sys
import threading
import traceback
from typing import Any

_PARENT_CHECK_S = 1.0


def _watch_parent(alive_fd: int, parent_pid: int) -> None:
    """Exit at once when rank 0 is gone: its end of the pipe closes whenever its process ends
    (SIGKILL included). The pid check covers a write end that leaked into a forked child."""

    def watch() -> None:
        while True:
            readable, _, _ = select.select([alive_fd], [], [], _PARENT_CHECK_S)
            if readable or os.getppid() != parent_pid:
                os._exit(1)  # no cleanup: a group whose peer died may block in its destructor

    threading.Thread(target=watch, name="anyquant-parent-watch", daemon=True).start()


def _counters(fd: int, world: int) -> Any:
    shared = mmap.mmap(fd, 8 * world)
    os.close(fd)
    return memoryview(shared).cast("q")


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    # Ctrl-C in a terminal reaches the whole process group; rank 0 decides how to stop (a server
    # drains first), and tells the workers, or dies and the liveness pipe ends them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(spec["parent_alive_fd"], spec["parent_pid"])
    progress = _counters(spec["progress_fd"], spec["world"])
    code = 1
    try:
        from anyquant.workers.worker import LoadRequest, run_worker

        fields = {f: spec[f] for f in LoadRequest.__dataclass_fields__}
        code = run_worker(
            LoadRequest(**fields), spec["rank"], spec["world"], spec["address"], spec["port"], progress
        )
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: see _watch_parent


if __name__ == "__main__":
    main(sys.argv[1:])
