"""GPU tests: every test here needs a CUDA device and is skipped, with the reason, without one
(CPU CI). `benchmarks/cuda_check.sh` runs them on a GPU machine."""

from __future__ import annotations

import pytest

from anyquant.utils.devices import cuda_unavailable_reason
from tests.cuda import DEVICE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DEVICE.type != "cuda":
        return
    reason = cuda_unavailable_reason(DEVICE)
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}")
    for item in items:
        if "tests/cuda/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
