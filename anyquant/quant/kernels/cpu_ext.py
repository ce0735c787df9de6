"""Builds and loads the C++ CPU kernels (csrc/), once, and says why they are unavailable if not.

The library is compiled by `torch.utils.cpp_extension.load` (ninja and the system C++ compiler)
into a directory under the user's cache keyed by a hash of the sources, the flags and the torch and
Python versions, so a rebuild happens only when one of those changes. `scripts/setup.sh` builds it
ahead (`python -m anyquant.quant.kernels.cpu_ext`), so neither the tests nor the first `generate`
pay the compile. A failed build is not fatal: `unavailable_reason()` returns a one-line summary,
the kernels built on it put it in their `cannot_run`, and the pure-torch kernels serve instead.

Nothing here runs at `import anyquant`: the registry imports the kernel module lazily, and the
kernel module calls `ops()` only from `cannot_run` / `load`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (
    "cpu_linear.cpp",
    "cpu_linear_avx2.cpp",
    "cpu_moe.cpp",
    "cpu_moe_avx2.cpp",
    "cpu_vnni.cpp",
    "cpu_moe_vnni.cpp",
    "cpu_a8_avx2.cpp",
    "cpu_moe_avx2_a8.cpp",
    "cpu_attention.cpp",
)
# Not compiled on their own, but part of what a build is keyed on.
_HEADERS = (
    "gemv.h",
    "gemm_tile.h",
    "gemv_avx2.h",
    "vnni.h",
    "a8_avx2.h",
    "moe_routing.h",
    "moe_schedule.h",
    "moe_int8_schedule.h",
    "attention.h",
    "attention_fp32.h",
    "attention_bf16.h",
    "attention_avx2.h",
)
# No -march flags: the AVX-512 (and AVX2) functions carry target attributes, so the library loads on
# any x86-64 CPU and the kernels refuse (with a reason) on CPUs without the instructions. -fopenmp:
# ATen's at::parallel_for is a header template that splits work only where the including file is compiled
# with OpenMP (else it runs the whole range on the calling thread); the library then links the
# libgomp.so.1 that torch has already loaded, so torch.set_num_threads governs it.
_CFLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_ENV_DIR = "ANYQUANT_EXTENSION_DIR"  # overrides where the build lives


def _build_key() -> str:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update((_CSRC / name).read_bytes())
    digest.update(" ".join(_CFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def _build_dir(key: str) -> Path:
    root = os.environ.get(_ENV_DIR)
    if root:
        return Path(root) / key
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "anyquant" / "cpu_ext" / key


def _ensure_ninja_on_path() -> None:
    """The venv's ninja (a Python dependency) is found even when the venv is not activated."""
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if scripts and scripts not in path.split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + path


def _summarize(error: BaseException) -> str:
    """The first compiler diagnostic (`file:line:col: error: ...`), else the first line naming an
    error, else the exception's last line; short enough for `inspect`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for pattern in (r":\d+(:\d+)?: (fatal )?error: ", r"\berror\b:"):
        for line in lines:
            if re.search(pattern, line, re.IGNORECASE):
                return line[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]


def build_library(name: str, sources: list[Path], build_dir: Path) -> str | None:
    """Compile and load `sources` as the torch library `name`; None, or why it failed (one line)."""
    if sys.platform != "linux" or sys.maxsize <= 2**32:
        return f"C++ extension unavailable: built only on 64-bit Linux, not {sys.platform}"
    try:
        from torch.utils import cpp_extension

        _ensure_ninja_on_path()
        cpp_extension.verify_ninja_availability()
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(path) for path in sources],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # any build or load failure means "use the fallback kernels"
        return f"C++ extension unavailable: {_summarize(error)}"
    return None


@functools.cache
def _load() -> tuple[Any, str | None]:
    """(torch.ops namespace, None) or (None, why it is unavailable). Built at most once per process."""
    key = _build_key()
    reason = build_library(f"anyquant_cpu_{key}", [_CSRC / name for name in _SOURCES], _build_dir(key))
    if reason is not None:
        return None, reason
    return torch.ops.anyquant_cpu, None


def unavailable_reason() -> str | None:
    """Why the C++ kernels cannot be used in this process, or None. Builds the library if needed."""
    return _load()[1]


def ops() -> Any:
    """The loaded ops (`torch.ops.anyquant_cpu`); raises RuntimeError with the reason if unavailable."""
    if torch.compiler.is_compiling():
        # Inside a torch.compile trace (a captured decode step): the kernels loaded the library
        # before, and the build check hashes files, which a trace cannot follow.
        return torch.ops.anyquant_cpu
    namespace, reason = _load()
    if namespace is None:
        raise RuntimeError(reason)
    return namespace


def main() -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"anyquant: {reason}; the pure-torch CPU kernels will be used", file=sys.stderr)
        return 0  # not fatal: the fallback kernels serve every format
    print(f"anyquant: C++ CPU kernels built in {_build_dir(_build_key())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
