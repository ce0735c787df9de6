"""Shared test fixtures: where ../shared is, and a skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The one switch that runs the suite eagerly: compiling a decode step costs tens of seconds of
# Inductor per model on the CI's two cores, and the suite builds hundreds of models. Set here,
# at import, so that CLI subprocesses inherit it; the tests of the compiled step
# (tests/engine/test_captured_step.py) ask for it explicitly with enforce_eager=False.
os.environ.setdefault("ANYQUANT_ENFORCE_EAGER", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ANYQUANT_SHARED", REPO.parent / "shared"))
THIRD_PARTY = SHARED / "fixtures" / "third_party"
STORIES = SHARED / "models" / "stories260K"


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread per test process (scripts/test.sh runs two workers on two cores); see test.sh.
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def shared_or_skip(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared not checked out beside the repository)")
    return path


@pytest.fixture
def third_party() -> Path:
    return shared_or_skip(THIRD_PARTY)


@pytest.fixture
def stories() -> Path:
    return shared_or_skip(STORIES)
