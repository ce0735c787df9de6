"""The checks every fused MoE call makes before it stacks a layer's experts: one kernel class that
has a fused op, one spec, one compute dtype and one packed format for all experts, and the
(gate, up, down) shapes of a SiLU-gated MLP. Shared by the bf16 / fp32 fused call
(avx512_moe.py's `cannot_fuse`) and the int8 one (avx512_moe_vnni.py's `cannot_fuse_int8`); each
adds, per expert, the packing checks of its own kernels, and after all experts its activation
checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from anyquant.quant.kernels.avx512 import RepackedWeightOnlyKernel
from anyquant.quant.kernels.avx512_vnni import Int8ActivationKernel
from anyquant.quant.kernels.base import LinearKernel

# The kernel family one fused call stacks (both carry spec, shape, compute dtype, fmt).
K = TypeVar("K", RepackedWeightOnlyKernel, Int8ActivationKernel)


def cannot_stack_experts(
    experts: Sequence[tuple[LinearKernel | None, ...]],
    act: str,
    ops: Mapping[type[K], str],
    family: type[K],
    packed_apart: Callable[[int, tuple[K, K, K], tuple[K, K, K]], str | None],
) -> str | None:
    """Why (gate, up, down) kernels of every expert cannot run as one call of `ops` (the kernel
    classes that have a fused op, all subclasses of `family`), or None. `packed_apart(e,
    (gate, up, down), expert 0's (gate, up, down))` says why expert e's kernels are packed in ways
    the call cannot mix (checked after the expert's shapes, before the next expert)."""
    if not experts:
        return "the layer has no experts"
    if act not in ("silu", "swish"):
        return f"activation {act} (the fused call computes silu)"
    first = experts[0][0]
    fusable = " or ".join(cls.name for cls in ops)
    if first is None or type(first) not in ops:
        return f"expert 0 runs on {'no kernel' if first is None else first.name}, not {fusable}"
    assert isinstance(first, family)
    first_expert: tuple[K, K, K] | None = None
    for e, kernels in enumerate(experts):
        for kernel in kernels:
            if type(kernel) is not type(first):
                name = "no kernel" if kernel is None else kernel.name
                return f"expert {e} runs on {name}, expert 0 on {first.name} (the call takes one kernel: {fusable})"
            assert isinstance(kernel, family)
            if kernel.spec != first.spec:
                return f"expert {e} is {kernel.spec.describe()}, expert 0 {first.spec.describe()}"
            if kernel.compute_dtype != first.compute_dtype:
                return "experts differ in compute dtype"
            if kernel.fmt != first.fmt:  # cpu_avx2: e4m3fn codes with NaN in some experts only
                return f"expert {e}'s codes are packed as format {kernel.fmt}, expert 0's as {first.fmt}"
        gate, up, down = kernels
        assert isinstance(gate, family) and isinstance(up, family) and isinstance(down, family)
        inter, hidden = gate.shape
        if up.shape != gate.shape or down.shape != (hidden, inter) or gate.shape != first.shape:
            return f"expert {e} has gate {gate.shape}, up {up.shape}, down {down.shape}"
        first_expert = first_expert or (gate, up, down)
        reason = packed_apart(e, (gate, up, down), first_expert)
        if reason is not None:
            return reason
    return None
