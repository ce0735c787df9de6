"""Loading reports itself: a bar over the weights' bytes on a terminal, log lines otherwise, and
the time of each phase."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.loader import load_model
from anyquant.loading.progress import LoadProgress
from anyquant.utils.tiny_model import write_tiny_model


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("progress"), "llama", seed=2)


def _checkpoint_bytes(path: Path) -> int:
    index = Checkpoint(path).index
    return sum(index.info(n).numel * index.info(n).torch_dtype.itemsize for n in index)


def test_without_a_terminal_loading_logs_quarters_and_phase_times(
    tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="anyquant"):
        loaded = load_model(tiny, progress=LoadProgress("tiny", stream=stream))
    assert stream.getvalue() == ""  # no bar drawn into a pipe or a log file
    messages = [r.getMessage() for r in caplog.records]
    quarters = [m for m in messages if "weights" in m and "%" in m]
    assert 1 <= len(quarters) <= 4 and "100%" in quarters[-1]
    total_kib = _checkpoint_bytes(tiny) / 2**10  # the tiny model is well under a MiB
    assert f"of {total_kib:.1f} KiB" in quarters[-1]
    assert any("phase reading took" in m for m in messages)
    assert any("phase repacking took" in m for m in messages)
    assert set(loaded.timings) == {"reading", "repacking"} and all(t > 0 for t in loaded.timings.values())


def test_on_a_terminal_loading_draws_a_bar_over_every_stored_byte(tiny: Path) -> None:
    terminal = _Terminal()
    progress = LoadProgress("tiny", stream=terminal)
    load_model(tiny, progress=progress)
    assert "loading weights" in terminal.getvalue()
    assert progress._done == progress._total == _checkpoint_bytes(tiny)


def test_a_bar_can_be_switched_off_on_a_terminal(tiny: Path) -> None:
    terminal = _Terminal()
    load_model(tiny, progress=LoadProgress("tiny", show_bar=False, stream=terminal))
    assert terminal.getvalue() == ""
