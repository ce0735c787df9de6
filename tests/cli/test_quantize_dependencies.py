"""`anyquant quantize` runs with nothing but the declared dependencies, and says up front, naming
the package and the pip command, when what its save step imports is missing.

The child process gets an import blocker (declared_only/sitecustomize.py) that refuses every
top-level module that is neither standard library nor provided by a distribution that
pyproject.toml's `dependencies` reach (transitively, through each one's own requirements): the
same modules a fresh `pip install anyquant` venv would hold, without building one.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from anyquant.utils.tiny_model import write_tiny_model

tomllib = pytest.importorskip("tomllib")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BLOCKER = Path(__file__).resolve().parent / "declared_only"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    """pyproject's `dependencies` and, transitively, their own unconditional requirements."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        # Declared but not installed here: nothing of it can be imported anyway.
        with contextlib.suppress(metadata.PackageNotFoundError):
            todo.extend(Requirement(r) for r in metadata.requires(req.name) or [])
    return seen


def allowed_modules(dists: set[str]) -> list[str]:
    """Top-level import names those distributions provide, plus anyquant itself."""
    provided = {
        module
        for module, owners in metadata.packages_distributions().items()
        if any(_norm(owner) in dists for owner in owners)
    }
    return sorted(provided | {"anyquant"})


def run_quantize(src: Path, dst: Path, allowed: list[str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(REPO)]),
        "ANYQUANT_ALLOWED_MODULES": json.dumps(allowed),
        "OMP_NUM_THREADS": "1",
    }
    argv = [
        sys.executable,
        "-m",
        "anyquant",
        "quantize",
        str(src),
        str(dst),
        "--format",
        "gptq",
        "--group-size",
        "32",
    ]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "src", "llama", seed=5)


def test_declared_set_is_what_it_claims() -> None:
    dists = declared_distributions()
    assert {"torch", "safetensors", "tokenizers", "numpy"} <= dists
    assert not {"pytest", "transformers", "fastapi"} & dists  # test and server extras are not declared
    modules = allowed_modules(dists)
    assert {"torch", "safetensors", "numpy", "anyquant"} <= set(modules)
    assert "pytest" not in modules


def test_quantize_needs_only_declared_dependencies(tiny: Path, tmp_path: Path) -> None:
    result = run_quantize(tiny, tmp_path / "out", allowed_modules(declared_distributions()))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_blocker_blocks(tiny: Path, tmp_path: Path) -> None:
    """Without this the test above could pass by importing anything: hide a module the run needs
    (tokenizers, which the save check does not cover) and the run must fail on it."""
    allowed = [m for m in allowed_modules(declared_distributions()) if m != "tokenizers"]
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('tokenizers') is not None)"
    env_check = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(BLOCKER), "ANYQUANT_ALLOWED_MODULES": json.dumps(allowed)},
        timeout=60,
    )
    assert env_check.returncode == 0  # hidden means not found, as in an environment without it
    result = run_quantize(tiny, tmp_path / "out", [m for m in allowed if m != "safetensors"])
    assert result.returncode != 0
    assert "safetensors" in result.stderr.strip().splitlines()[-1]


def test_missing_save_dependency_is_reported_before_any_work(tiny: Path, tmp_path: Path) -> None:
    allowed = [m for m in allowed_modules(declared_distributions()) if m != "numpy"]
    result = run_quantize(tiny, tmp_path / "out", allowed)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "anyquant quantize: error: writing safetensors files needs the Python package(s) numpy, which "
        "cannot be imported; install with: pip install numpy"
    )
    assert not (tmp_path / "out").exists()  # refused before creating the output or reading a layer
