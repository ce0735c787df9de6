"""One MoE layer's routed experts in one C++ call on int8 activations: `moe_experts_vnni`
(csrc/cpu_moe_vnni.cpp, AVX512-VNNI CPUs) or `moe_experts_avx2_a8` (csrc/cpu_moe_avx2_a8.cpp,
AVX2 CPUs), one schedule (csrc/moe_int8_schedule.h) over each instruction set's int8 dot
products: the fused call for experts that the `cpu_avx512_vnni` or `cpu_avx2_a8` kernel serves.

Those are experts whose spec quantizes activations to int8 per token (or per tensor, static):
W8A8 int8 checkpoints, and weight-only checkpoints loaded with `activation_dtype="int8"` (W4A8).
`FusedInt8Experts` stacks the experts' already-repacked weights (csrc/vnni.h's layout, which
both kernels share) along a leading expert dimension once, gate and up of an expert side by side,
and points every expert's own kernel at its slice of the stack (one copy of the weights; the
per-expert path still works). The call quantizes x once per token and h once per (token, expert)
row, exactly as the reference's `fake_quantize_activations` does (the per-expert path's
numerics; only h's rounding differs: fp32 here, the compute dtype there), runs the int8 dot
products of the experts' own kernel class (the same block kernels, so the same exact int32
sums) and returns the weighted sum in fp32. Same work split as the bf16 fused call
(avx512_moe.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel, Int8ActivationKernel
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.kernels.moe_act_order import act_order_tables
from anyquant.quant.kernels.moe_fusable import cannot_stack_experts

# The int8-activation kernels whose experts `FusedInt8Experts` runs, and the extension op for each.
INT8_OPS: dict[type[Int8ActivationKernel], str] = {
    Avx512VnniKernel: "moe_experts_vnni",
    Avx2Int8ActivationKernel: "moe_experts_avx2_a8",
}


def cannot_fuse_int8(experts: Sequence[tuple[LinearKernel | None, ...]], act: str) -> str | None:
    """Why (gate, up, down) int8-activation kernels of every expert cannot run as one fused call."""
    reason = cannot_stack_experts(experts, act, INT8_OPS, Int8ActivationKernel, _packed_apart)
    if reason is not None:
        return reason
    first = experts[0][0]
    assert isinstance(first, Int8ActivationKernel)
    act_spec = first.spec.act
    assert act_spec is not None  # the int8-activation kernels refuse weight-only specs
    if act_spec.dynamic and act_spec.granularity != "token":
        return f"activations are quantized ({act_spec.describe()}); per-tensor dynamic scales span each expert's tokens"
    if not act_spec.dynamic:
        scales = {k.static_scale for ks in experts for k in ks[:2] if isinstance(k, Int8ActivationKernel)}
        if len(scales) != 1:
            return f"activations are quantized ({act_spec.describe()}) with gate / up input scales that differ by expert"
    return None


def _packed_apart(
    e: int,
    expert: tuple[Int8ActivationKernel, Int8ActivationKernel, Int8ActivationKernel],
    first: tuple[Int8ActivationKernel, Int8ActivationKernel, Int8ActivationKernel],
) -> str | None:
    """Why expert e's projections are packed in ways one fused call cannot mix, or None."""
    gate, up, down = expert
    if up.group != gate.group or up.k_pad != gate.k_pad or down.group != first[2].group:
        return f"expert {e}'s projections are packed differently"
    for name in ("zero", "offset"):
        present = {getattr(k, name) is None for k in expert}
        if len(present) != 1 or (getattr(first[0], name) is None) not in present:
            return f"expert {e}'s projections differ in {name}s"
    return None


class FusedInt8Experts(nn.Module):
    """All routed experts of one layer on int8 activations: x [T, H], weights / ids [T, k] -> fp32 [T, H],
    on the op of the experts' kernel class (`INT8_OPS`; `cannot_fuse_int8` checked they share one)."""

    w13: Tensor
    s13: Tensor
    z13: Tensor | None
    o13: Tensor | None
    w2: Tensor
    s2: Tensor
    z2: Tensor | None
    o2: Tensor | None
    perm13: Tensor | None
    pos2: Tensor | None
    h_static_scale: Tensor | None

    def __init__(self, experts: Sequence[tuple[LinearKernel | None, ...]]) -> None:
        super().__init__()
        kernels = [tuple(k for k in ks if isinstance(k, Int8ActivationKernel)) for ks in experts]
        gate, _, down = kernels[0]
        self.op_name = INT8_OPS[type(gate)]
        self.inter, self.hidden = gate.shape
        self.fmt, self.zconst = gate.fmt, gate.zconst
        self.group13, self.group2 = gate.group, down.group
        self.compute_dtype = gate.compute_dtype
        self.divisor = gate.divisor
        self.x_static_scale = gate.static_scale  # one for every gate and up (cannot_fuse_int8)

        def stack(parts: list[list[Tensor | None]]) -> Tensor | None:
            if parts[0][0] is None:
                return None
            return torch.stack([torch.cat([p for p in ps if p is not None]) for ps in parts])

        w13 = stack([[g.packed, u.packed] for g, u, _ in kernels])
        s13 = stack([[g.scale, u.scale] for g, u, _ in kernels])
        assert w13 is not None and s13 is not None
        z13 = stack([[g.zero, u.zero] for g, u, _ in kernels])
        o13 = stack([[g.offset, u.offset] for g, u, _ in kernels])
        w2 = torch.stack([d.packed for _, _, d in kernels])
        s2 = torch.stack([d.scale for _, _, d in kernels])
        z2 = stack([[d.zero] for _, _, d in kernels])
        o2 = stack([[d.offset] for _, _, d in kernels])
        # Act-order: packed column c of gate / up reads input perm[c]; intermediate feature i sits
        # at the down projection's packed column argsort(perm)[i].
        perm13, pos2 = act_order_tables(kernels, self.hidden, self.inter)
        # Every expert's own kernel now reads its slice of the stacks: one copy of the weights.
        for e, (g, u, d) in enumerate(kernels):
            nb = g.scale.shape[0]
            g.packed, u.packed = w13[e, :nb], w13[e, nb:]
            g.scale, u.scale = s13[e, :nb], s13[e, nb:]
            if z13 is not None:
                g.zero, u.zero = z13[e, :nb], z13[e, nb:]
            if o13 is not None:
                g.offset, u.offset = o13[e, :nb], o13[e, nb:]
            d.packed, d.scale = w2[e], s2[e]
            if z2 is not None:
                d.zero = z2[e]
            if o2 is not None:
                d.offset = o2[e]
        for name, value in (
            ("w13", w13), ("s13", s13), ("z13", z13), ("o13", o13),
            ("w2", w2), ("s2", s2), ("z2", z2), ("o2", o2), ("perm13", perm13), ("pos2", pos2),
        ):  # fmt: skip
            self.register_buffer(name, value, persistent=False)
        h_static = None
        if gate.static_scale > 0:
            h_static = torch.tensor([d.static_scale for _, _, d in kernels], dtype=torch.float32)
        self.register_buffer("h_static_scale", h_static, persistent=False)

    @property
    def num_experts(self) -> int:
        return int(self.w13.shape[0])

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        return getattr(cpu_ext.ops(), self.op_name)(
            x.to(self.compute_dtype),
            ids.to(torch.int64),
            weights.to(torch.float32),
            self.w13,
            self.s13,
            self.z13,
            self.o13,
            self.w2,
            self.s2,
            self.z2,
            self.o2,
            self.fmt,
            self.zconst,
            self.group13,
            self.group2,
            self.inter,
            self.hidden,
            self.perm13,
            self.pos2,
            self.divisor,
            self.x_static_scale,
            self.h_static_scale,
        )

    def extra_repr(self) -> str:
        extras = [
            n for n in ("z13", "o13", "perm13", "pos2", "h_static_scale") if getattr(self, n) is not None
        ]
        text = f"{self.op_name}, experts={self.num_experts}, inter={self.inter}, hidden={self.hidden}, int8 activations"
        return text + "".join(f", {n}" for n in extras)
