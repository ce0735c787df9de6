"""The `LinearKernel` interface: computes x @ W.T for one layer from its canonical weight.

A kernel says why it cannot serve a layer (`cannot_run`), receives the canonical weight once
(`load`, where it repacks into whatever layout it likes) and multiplies (`forward`). It never
reads checkpoints or knows which format the weight came from. `cannot_run` is the shared
pre-check (`precheck`: device, quantized or not, layer role, compute dtype, shape, from what the
kernel class declares) followed by the kernel's own `rejects`; every rejection is a sentence,
because `anyquant inspect` prints it.

A kernel that quantizes its input with dynamic scales sets `dynamic_act` in `load`, and its
forward then also takes `act_amax=`: an amax (`anyquant.quant.reference.activation_amax` shape)
computed by the caller, which a row-parallel layer takes over every rank's slice of the input.
The kernel never communicates itself.

`check_weight` is the check every quantized kernel's `load` starts with: one canonical weight of
the shape the kernel was built for; `round_up` pads a dimension to the multiple a layout needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from anyquant.errors import TensorError
from anyquant.quant.spec import MATMUL_KINDS, ActQuant, LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight


class LinearKernel(nn.Module, ABC):
    name: ClassVar[str]
    priority: ClassVar[int] = 0  # higher wins when several can run
    # How this kernel quantizes activations with dynamic scales (set by `load`); None: it does not.
    dynamic_act: ActQuant | None = None

    def __init__(self, shape: tuple[int, int], compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = shape  # (out_features, in_features)
        self.compute_dtype = compute_dtype

    # What the shared pre-check requires (see `precheck`); a kernel declares only what differs.
    serves: ClassVar[Literal["quantized", "dense"]] = "quantized"
    device_types: ClassVar[tuple[str, ...] | None] = None  # None: any device
    kinds: ClassVar[frozenset[str]] = MATMUL_KINDS  # the layer roles it multiplies
    compute_dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None  # None: any
    empty_shapes: ClassVar[bool] = False  # serves layers with no weights ([0, K] or [N, 0])
    applies_offsets: ClassVar[bool] = True  # applies float offsets per group (spec.has_offset)
    # `load` receives the weight already on the layer's device (its repacking op runs there, e.g.
    # a CUDA-only packing op); otherwise it loads on the host and the module is moved after.
    load_on_device: ClassVar[bool] = False
    # Buffers every call streams whole (the repacked weights, their scales): the loader moves them
    # into huge pages on CPU once loading is done (utils/huge_pages.py).
    streamed_buffers: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        """Why this kernel cannot serve the layer, or None if it can."""
        reason = precheck(cls, spec, kind, device, shape, compute_dtype)
        if reason is None and spec is not None:
            reason = cls.rejects(spec, shape, compute_dtype)
        return reason

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        """Why this kernel cannot serve a quantized layer that passed the shared pre-check."""
        return None

    @abstractmethod
    def load(self, weight: QuantWeight | Tensor) -> None:
        """Receive the canonical (or dense) weight once; keep what forward needs as buffers."""

    @abstractmethod
    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x: [T, in] in compute dtype -> [T, out] in compute dtype."""

    def extra_repr(self) -> str:
        return f"{self.name}, shape={self.shape}, dtype={self.compute_dtype}"


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def precheck(
    kernel: type[LinearKernel],
    spec: QuantSpec | None,
    kind: LayerKind,
    device: torch.device,
    shape: tuple[int, int],
    compute_dtype: torch.dtype,
) -> str | None:
    """The rejections every kernel shares, from what its class declares (`serves`,
    `device_types`, `kinds`, `compute_dtypes`, `empty_shapes`, `applies_offsets`), in this order:
    device, quantized or not, role, compute dtype, empty shape (quantized kernels only), offsets."""
    if kernel.device_types is not None and device.type not in kernel.device_types:
        where = " or ".join(t.upper() if t == "cpu" else t for t in kernel.device_types)
        return f"runs on {where} only, the layer is on {device.type}"
    if kernel.serves == "quantized" and spec is None:
        return "layer is unquantized (the dense kernel runs it)"
    if kernel.serves == "dense" and spec is not None:
        return "layer is quantized"
    if kind not in kernel.kinds:
        if kind == "router":
            return (
                "MoE routers keep the reference kernel's fp32 dequantize-then-matmul "
                "(routing flips on tiny differences)"
            )
        if kind == "embedding":
            return "embedding layers are not matrix multiplications (looked up, dequantized at load)"
        return f"{kind} layers are not matrix multiplications"
    if kernel.compute_dtypes is not None and compute_dtype not in kernel.compute_dtypes:
        return f"compute dtype {compute_dtype} is not {_dtype_names(kernel.compute_dtypes)}"
    if not kernel.empty_shapes and kernel.serves == "quantized" and min(shape) <= 0:
        return f"layer shape {list(shape)} has no weights"
    if not kernel.applies_offsets and spec is not None and spec.has_offset:
        return f"float offsets per group (GGUF minimums) are not applied by {kernel.name}"
    return None


def check_weight(weight: QuantWeight | Tensor, kernel: LinearKernel) -> QuantWeight:
    """`weight` as the one [N, K] QuantWeight of `kernel`'s shape; a TypeError or TensorError
    saying what else it is."""
    if not isinstance(weight, QuantWeight):
        raise TypeError(f"{kernel.name} kernel expects a QuantWeight")
    if weight.num_experts is not None:
        raise TypeError(
            f"{kernel.name} kernel serves one [N, K] weight, got {weight.num_experts} experts stacked "
            "[E, N, K]; load each expert's slice into its own kernel"
        )
    if tuple(weight.shape) != tuple(kernel.shape):
        raise TensorError(
            "weight", f"has shape {list(weight.shape)} but the kernel was built for {list(kernel.shape)}"
        )
    return weight


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `value`."""
    return -(-value // multiple) * multiple
