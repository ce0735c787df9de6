"""A tensor-parallel worker that exits on purpose at the stage named by ANYQUANT_TEST_WORKER_EXIT.

Run as `python -m tests.parallel._failing_worker SPEC` in place of the real entry point (the rank-0
side sets `launch.WORKER_MODULE`). Before exiting it prints when it exits (wall clock), so the
test can tell how long rank 0 took to report the death from the last output quoted in the error.
Stages: start (before touching the store), rendezvous (joined the store, before the process
group), load (as it starts loading its shard), step (in its third forward pass).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NoReturn

STAGE = os.environ["ANYQUANT_TEST_WORKER_EXIT"]
CODES = {"start": 3, "rendezvous": 4, "load": 5, "step": 6}


def die(*_: Any, **__: Any) -> NoReturn:
    print(f"test worker exits at stage {STAGE}", file=sys.stderr)
    print(f"exit-time {time.time():.3f}", file=sys.stderr, flush=True)
    os._exit(CODES[STAGE])


if STAGE == "start":
    die()

from anyquant.parallel import wire  # noqa: E402 - after the cheap stage above
from anyquant.workers import worker  # noqa: E402
from anyquant.workers.main import main  # noqa: E402

if STAGE == "rendezvous":
    worker.form_groups = die  # type: ignore[assignment]
elif STAGE == "load":
    worker.load_shard = die  # type: ignore[assignment]
elif STAGE == "step":
    real = worker._run_command
    forwards = [0]

    def run_command(model: Any, state: Any, device: Any, caches: Any, msg: Any) -> bool:
        if int(msg[0]) == wire.FORWARD:
            forwards[0] += 1
            if forwards[0] == 3:
                die()
        return real(model, state, device, caches, msg)

    worker._run_command = run_command  # type: ignore[assignment]

main(sys.argv[1:])
