"""Which device a model runs on, and what that device can do.

Owns the one check of a requested device (`resolve_device`: cpu or cuda[:i], refused early and
with the reason when CUDA is asked for but torch cannot use it), the properties of a CUDA device
that kernel and dtype choices depend on (`CudaProperties`: compute capability, name, memory), and
the process-wide CUDA numerics settings the engine relies on (`configure_cuda_numerics`).

`simulated_cuda` stands in for a GPU that is not there: `inspect --compute-capability 7.5`
plans for a T4 on a machine without one, and CPU tests check the kernel table's CUDA choices.
It is a context variable rather than an argument because every kernel's `cannot_run` takes a
`torch.device`, which cannot carry a capability; only CUDA kernels and the dtype policy read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from anyquant.errors import UnsupportedError

# Ampere (sm80) is the first architecture with bf16 tensor cores; Ada (sm89) the first with fp8.
BF16_CAPABILITY = (8, 0)
FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class CudaProperties:
    """What kernel and dtype choices need to know about one CUDA device."""

    name: str
    capability: tuple[int, int]
    total_memory: int = 0  # bytes; 0 when unknown (a simulated device)
    simulated: bool = False

    @property
    def sm(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}"

    @property
    def has_bf16(self) -> bool:
        """bf16 tensor-core matmuls (sm80+). Older cards emulate bf16 slowly or not at all."""
        return self.capability >= BF16_CAPABILITY

    @property
    def has_fp8(self) -> bool:
        """fp8 tensor-core matmuls (`torch._scaled_mm`), sm89+."""
        return self.capability >= FP8_CAPABILITY

    def describe(self) -> str:
        sim = ", simulated" if self.simulated else ""
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]}{sim})"


_SIMULATED: ContextVar[CudaProperties | None] = ContextVar("anyquant_simulated_cuda", default=None)


def parse_capability(text: str) -> tuple[int, int]:
    """'7.5' or '75' or 'sm75' -> (7, 5); ValueError naming the accepted forms otherwise."""
    raw = text.strip().lower().removeprefix("sm_").removeprefix("sm")
    major, _, minor = raw.partition(".")
    if not minor and len(raw) >= 2 and raw.isdigit():
        major, minor = raw[:-1], raw[-1]
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"compute capability {text!r}: expected MAJOR.MINOR such as 7.5, 8.0 or 9.0")
    return int(major), int(minor)


@contextlib.contextmanager
def simulated_cuda(capability: tuple[int, int], name: str | None = None) -> Iterator[CudaProperties]:
    """Within the block, every CUDA device reports `capability` (no GPU needed)."""
    props = CudaProperties(name or "GPU", capability, simulated=True)
    token = _SIMULATED.set(props)
    try:
        yield props
    finally:
        _SIMULATED.reset(token)


def cuda_properties(device: torch.device) -> CudaProperties:
    """The properties of CUDA device `device` (the simulated one inside `simulated_cuda`)."""
    simulated = _SIMULATED.get()
    if simulated is not None:
        return simulated
    check_cuda_available(device)
    props = torch.cuda.get_device_properties(device)
    return CudaProperties(props.name, (props.major, props.minor), int(props.total_memory))


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """Why torch cannot run on CUDA device `device` in this process, or None if it can."""
    if _SIMULATED.get() is not None:
        return None
    build = torch.version.cuda
    if build is None:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
            "(e.g. from the download.pytorch.org/whl/cu12x index) to run on a GPU"
        )
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} (CUDA {build}) sees no GPU: check the NVIDIA driver "
            "(`nvidia-smi`) and CUDA_VISIBLE_DEVICES"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"there is no {device}: {count} CUDA device(s) are visible (cuda:0 .. cuda:{count - 1})"
    return None


def check_cuda_available(device: torch.device) -> None:
    reason = cuda_unavailable_reason(device)
    if reason is not None:
        raise UnsupportedError(f"device {str(device)!r} was requested, but {reason}")


def resolve_device(device: str | torch.device) -> torch.device:
    """The device a model loads onto: 'cpu' or 'cuda[:i]'. Fails before anything is read or
    started when CUDA is asked for and cannot be used, or for a device anyquant does not run on."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UnsupportedError(f"device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        check_cuda_available(dev)
        return dev
    raise UnsupportedError(f"device {str(dev)!r} is not supported; anyquant runs on cpu and cuda[:N]")


def configure_cuda_numerics() -> None:
    """Make fp16/bf16 matmuls accumulate in fp32 all the way. torch lets cuBLAS reduce split-K
    partial sums in the 16-bit type by default, which loses bits and, in fp16, can overflow a
    sum whose final value fits. Process-wide (torch offers no per-call switch)."""
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def describe_device(device: torch.device) -> str:
    """'cpu', or 'cuda:0, NVIDIA H100 80GB HBM3 (compute capability 9.0)' for a CUDA device."""
    if device.type != "cuda":
        return str(device)
    return f"{device}, {cuda_properties(device).describe()}"
