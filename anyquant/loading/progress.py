"""Loading progress and time per phase: a tqdm bar on a terminal, log lines everywhere else.

Owns how a load reports itself: `LoadProgress.phase(name)` times one phase (reading headers and
planning, repacking weights, warm-up...) into a timings dict and logs it; `advance(nbytes)` moves
the weights bar, or logs every quarter when stderr is not a terminal (a server under systemd or
docker, CI), so logs stay readable. tqdm is imported only when a bar is actually drawn.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

log = logging.getLogger("anyquant.loading")


def stream_is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class LoadProgress:
    """`show_bar`: None draws a bar only when `stream` is a terminal; False never (log lines only),
    as for every rank but the first under tensor parallelism."""

    def __init__(self, label: str, show_bar: bool | None = None, stream: TextIO | None = None) -> None:
        self.label = label
        self.timings: dict[str, float] = {}
        self._stream = stream if stream is not None else sys.stderr
        self._show_bar = stream_is_terminal(self._stream) if show_bar is None else show_bar
        self._bar: Any = None
        self._total = 0
        self._done = 0
        self._next_log_fraction = 0.25
        self._started = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            log.info("%s: phase %s took %.2fs", self.label, name, self.timings[name])

    def start_weights(self, total_bytes: int, desc: str = "loading weights") -> None:
        self._total, self._done, self._started = max(total_bytes, 1), 0, time.perf_counter()
        if self._show_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self._stream,
                leave=False,
                dynamic_ncols=True,
            )

    def advance(self, nbytes: int) -> None:
        self._done = min(self._done + nbytes, self._total)
        if self._bar is not None:
            self._bar.update(nbytes)
            return
        fraction = self._done / self._total if self._total else 1.0
        if fraction >= self._next_log_fraction:
            log.info(
                "%s: weights %3.0f%% (%s of %s, %.1fs)",
                self.label,
                100 * fraction,
                _size(self._done),
                _size(self._total),
                time.perf_counter() - self._started,
            )
            while self._next_log_fraction <= fraction:
                self._next_log_fraction += 0.25

    def finish_weights(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
