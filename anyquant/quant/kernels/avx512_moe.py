"""One MoE layer's routed experts in one C++ call: `moe_experts` (csrc/cpu_moe.cpp, AVX512_BF16
CPUs) or `moe_experts_avx2` (csrc/cpu_moe_avx2.cpp, AVX2 + FMA CPUs), one schedule
(csrc/moe_schedule.h) over each instruction set's dot products.

`FusedExperts` takes the experts' already-loaded `cpu_avx512` or `cpu_avx2` kernels (gate, up,
down of every expert; both repack the same bytes, RepackedWeightOnlyKernel), stacks their
repacked weights along a leading expert dimension once, gate and up of an expert side by side so
both are one work item, and points every expert's kernel at its slice of the stack: the weights
exist once, and each expert's own kernel still runs it alone (the per-expert path, kept for what
the fused call does not serve; it groups tokens with a host sync, `.tolist()` of the counts, so
a compiled step runs it as an opaque op). The call groups the token/slot pairs by expert in C++
(no per-layer host sync: the compiled decode step captures it through its shape-only fake),
splits the (expert, block of 16 rows) items of all chosen experts over the threads and returns the weighted sum in fp32.

Act-order (GPTQ g_idx) experts pass their gate's and up's input orders (x is gathered in each) and
the down projection's as where each intermediate feature goes; float-offset experts (GGUF k-quant
minimums) pass their offsets, stacked so that each expert's own kernel reads its slice of them as
well. Quantized activations (fp8 dynamic per token / group or static; int8 W8A8, whose experts
first become `cpu_avx512` twins over the same codes, `weight_only_twins`) are quantized as the
reference does: x once for all experts here, h per (token, expert) row inside the call. fp8
activations run on both calls (`cpu_avx2` takes fp8 weights with fp8 activations); int8
activations of integer weights on AVX2 run on `cpu_avx2_a8` and its own fused call instead.

`cannot_fuse` says why a set of experts cannot be fused (e.g. another kernel serves them, per-tensor
dynamic activation scales); the caller then keeps the per-expert path. `fuse` picks the call for the
loaded kernels: this one (the op named by the experts' kernel class, `_OPS`), or for
`cpu_avx512_vnni` / `cpu_avx2_a8` experts (int8 activations: W8A8, or weight-only loaded with
`activation_dtype="int8"`) its int8-dot-product twin in avx512_moe_vnni.py.
`fusion_from_plan` predicts the same from the load plan, and `FUSED_CALLS` names the call, for
`inspect`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.avx2 import Avx2WeightOnlyKernel
from anyquant.quant.kernels.avx2_a8 import Avx2Int8ActivationKernel
from anyquant.quant.kernels.avx512 import Avx512WeightOnlyKernel, RepackedWeightOnlyKernel
from anyquant.quant.kernels.avx512_moe_vnni import FusedInt8Experts, cannot_fuse_int8
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel, Int8ActivationKernel
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.kernels.moe_act_order import act_order_tables
from anyquant.quant.kernels.moe_fusable import cannot_stack_experts
from anyquant.quant.kernels.torch_cpu import _quantize_int8_activations
from anyquant.quant.reference import fake_quantize_activations
from anyquant.quant.spec import FP8_MAX, QuantSpec

_ACT_CODES = {"fp8_e4m3": 1, "fp8_e5m2": 2, "int8": 3}  # the call's act2 codes
# The fused call that the experts' (per-expert) kernel leads to, as `inspect` names it.
FUSED_CALLS = {
    Avx512WeightOnlyKernel.name: "moe_experts (bf16 dot products)",
    "cpu_w8a8_int8": "moe_experts (bf16 dot products over the int8 codes)",
    Avx512VnniKernel.name: "moe_experts_vnni (int8 dot products, AVX512-VNNI)",
    Avx2Int8ActivationKernel.name: "moe_experts_avx2_a8 (int8 dot products, AVX2)",
    Avx2WeightOnlyKernel.name: "moe_experts_avx2 (fp32 FMA, AVX2)",
}
# The weight-only kernels whose experts `FusedExperts` runs, and the extension op for each.
_OPS: dict[type[RepackedWeightOnlyKernel], str] = {
    Avx512WeightOnlyKernel: "moe_experts",
    Avx2WeightOnlyKernel: "moe_experts_avx2",
}


def fuse(
    experts: Sequence[tuple[LinearKernel | None, ...]], act: str
) -> tuple[FusedExperts | FusedInt8Experts | None, str | None]:
    """The fused call for the loaded experts' kernels (int8 dot products for cpu_avx512_vnni and
    cpu_avx2_a8 experts, bf16 for cpu_avx512 ones, fp32 FMA for cpu_avx2 ones), or None and why not."""
    if any(isinstance(k, Int8ActivationKernel) for ks in experts for k in ks):
        reason = cannot_fuse_int8(experts, act)
        return (FusedInt8Experts(experts) if reason is None else None), reason
    reason = cannot_fuse(experts, act)
    return (FusedExperts(experts) if reason is None else None), reason


def weight_only_twins(
    experts: Sequence[tuple[LinearKernel | None, ...]],
) -> list[tuple[LinearKernel | None, ...]] | None:
    """W8A8 int8 experts (`cpu_w8a8_int8`, torch._int_mm one expert at a time) as `cpu_avx512`
    kernels over the same int8 codes and scales, with the same activation quantization, so the
    fused call can run them; None unless every projection is such a kernel the twin can serve.
    Numerics: the activations are quantized exactly as before, then enter the dot products as
    bf16 (or exact fp32 parts); the int32 product becomes an fp32 one (the per-expert path's
    result up to rounding)."""
    from anyquant.quant.kernels.torch_cpu import CpuW8A8Int8Kernel
    from anyquant.quant.spec import ActQuant, QuantSpec
    from anyquant.quant.weight import QuantWeight

    if not experts or not all(isinstance(k, CpuW8A8Int8Kernel) for ks in experts for k in ks):
        return None
    twins = []
    for ks in experts:
        row: list[LinearKernel | None] = []
        for k in ks:
            assert isinstance(k, CpuW8A8Int8Kernel)
            act = k.dynamic_act or ActQuant(
                "int8", dynamic=False, granularity="tensor", symmetric=k.input_zero is None
            )
            spec = QuantSpec("int8", "channel", act=act)
            if Avx512WeightOnlyKernel.cannot_run(
                replace(spec, act=None), "experts", k.codes.device, k.shape, k.compute_dtype
            ):
                return None
            weight = QuantWeight(spec, k.shape, k.codes, k.scale, None, None, k.input_scale, k.input_zero)
            twin = Avx512WeightOnlyKernel(k.shape, k.compute_dtype)
            twin.load(weight.validate("expert"))
            row.append(twin)
        twins.append(tuple(row))
    return twins


def cannot_fuse(experts: Sequence[tuple[LinearKernel | None, ...]], act: str) -> str | None:
    """Why (gate, up, down) kernels of every expert cannot run as one fused call, or None."""
    reason = cannot_stack_experts(experts, act, _OPS, RepackedWeightOnlyKernel, _packed_apart)
    return reason if reason is not None else _cannot_fuse_activations(experts)


def _packed_apart(
    e: int,
    expert: tuple[RepackedWeightOnlyKernel, RepackedWeightOnlyKernel, RepackedWeightOnlyKernel],
    first: tuple[RepackedWeightOnlyKernel, RepackedWeightOnlyKernel, RepackedWeightOnlyKernel],
) -> str | None:
    """Why expert e's gate, up and down are packed in ways one fused call cannot mix, or None."""
    gate, up, down = expert
    if up.group != gate.group or up.k_pad != gate.k_pad or (gate.zz is None) != (up.zz is None):
        return f"expert {e}'s gate and up are packed differently"
    if (down.zz is None) != (gate.zz is None):
        return f"expert {e}'s down has zero points where gate has none, or the reverse"
    if (gate.offset_t is None) != (up.offset_t is None):
        return f"expert {e}'s gate and up differ in float offsets"
    return None


def fusion_from_plan(kernels: set[str], specs: set[QuantSpec | None], act: str, biases: bool) -> str | None:
    """From the load plan alone (inspect): why a block's routed experts will not run as one fused
    call, or None. The loader decides on the loaded kernels (`cannot_fuse`); the checks that need
    weights (act-order orders, offsets) never refuse, so the two agree."""
    if biases:
        return "experts have biases"
    if act not in ("silu", "swish"):
        return f"activation {act} (the fused call computes silu)"
    if len(specs) != 1 or len(kernels) != 1:
        return f"experts differ in kernel or scheme ({', '.join(sorted(kernels))})"
    (kernel,), (spec,) = kernels, specs
    if spec is None or kernel not in FUSED_CALLS:
        return f"experts run on {kernel}, not {' or '.join(FUSED_CALLS)}"
    a = spec.act
    if kernel == Avx2WeightOnlyKernel.name and a is not None and a.type == "int8":
        return f"activations are quantized ({a.describe()}); the AVX2 call takes fp8 activations only"
    int8_kernels = (Avx512VnniKernel.name, Avx2Int8ActivationKernel.name)
    if kernel in int8_kernels and a is not None and a.dynamic and a.granularity != "token":
        return (
            f"activations are quantized ({a.describe()}); per-tensor dynamic scales span each expert's tokens"
        )
    if a is None:
        return None
    if a.type not in _ACT_CODES or (a.type == "int8" and a.granularity == "group"):
        return f"activations are quantized ({a.describe()})"
    if a.dynamic and a.granularity == "tensor":
        return (
            f"activations are quantized ({a.describe()}); per-tensor dynamic scales span each expert's tokens"
        )
    if not a.symmetric:
        return f"activations are quantized ({a.describe()}) with input zero points"
    return None


def _cannot_fuse_activations(experts: Sequence[tuple[LinearKernel | None, ...]]) -> str | None:
    """Quantized activations the call reproduces: fp8, dynamic per token or per group, or static
    per tensor where every expert's gate and up share one input scale (x is quantized once)."""
    first = experts[0][0]
    assert isinstance(first, RepackedWeightOnlyKernel)
    act = first.spec.act
    if act is None:
        return None
    if isinstance(first, Avx2WeightOnlyKernel) and act.type == "int8":
        return f"activations are quantized ({act.describe()}); the AVX2 call takes fp8 activations only"
    if act.type not in _ACT_CODES:
        return f"activations are quantized ({act.describe()}); the call takes fp8 or int8 activations"
    if act.type == "int8" and act.granularity == "group":
        return f"activations are quantized ({act.describe()}); int8 takes one scale per row"
    if act.dynamic and act.granularity not in ("token", "group"):
        return f"activations are quantized ({act.describe()}); per-tensor dynamic scales span each expert's tokens"
    if not act.dynamic:
        scales = [k.input_scale for ks in experts for k in ks[:2] if isinstance(k, RepackedWeightOnlyKernel)]
        known = [s for s in scales if s is not None and s.numel() == 1]
        if len(known) != len(scales) or any(not torch.equal(s, known[0]) for s in known):
            return f"activations are quantized ({act.describe()}) with gate / up input scales that differ by expert"
        if any(
            k.input_zero is not None for ks in experts for k in ks if isinstance(k, RepackedWeightOnlyKernel)
        ):
            return f"activations are quantized ({act.describe()}) with input zero points"
        downs = [ks[2] for ks in experts]
        if any(
            not isinstance(d, RepackedWeightOnlyKernel) or d.input_scale is None or d.input_scale.numel() != 1
            for d in downs
        ):
            return f"activations are quantized ({act.describe()}); down projections need one input scale each"
    return None


def _stack_offsets(kernels: Sequence[RepackedWeightOnlyKernel | None]) -> Tensor | None:
    """The kernels' offsets [groups, N] stacked (an expert without offsets gets zeros), or None."""
    if all(k is None or k.offset_t is None for k in kernels):
        return None
    like = next(k.offset_t for k in kernels if k is not None and k.offset_t is not None)
    return torch.stack(
        [k.offset_t if k is not None and k.offset_t is not None else torch.zeros_like(like) for k in kernels]
    )


class FusedExperts(nn.Module):
    """All routed experts of one layer: x [T, H], router weights / ids [T, k] -> fp32 [T, H], on
    the op of the experts' kernel class (`moe_experts` for cpu_avx512, `moe_experts_avx2` for
    cpu_avx2; `cannot_fuse` checked that they all share one)."""

    w13: Tensor
    s13: Tensor
    z13: Tensor | None
    w2: Tensor
    s2: Tensor
    z2: Tensor | None
    lut: Tensor
    act_scale13: Tensor | None
    act_scale2: Tensor | None
    perm13: Tensor | None
    pos2: Tensor | None
    off13: Tensor | None
    off2: Tensor | None

    def __init__(self, experts: Sequence[tuple[LinearKernel | None, ...]]) -> None:
        super().__init__()
        kernels = [tuple(k for k in ks if isinstance(k, RepackedWeightOnlyKernel)) for ks in experts]
        gate, _, down = kernels[0]
        self.op_name = _OPS[type(gate)]
        self.inter, self.hidden = gate.shape
        self.k_pad = gate.k_pad
        self.group13, self.group2, self.fmt = gate.group, down.group, gate.fmt
        self.compute_dtype = gate.compute_dtype
        # Gate then up: blocks [0, nb) are the gate's 16-row blocks, [nb, 2 nb) the up's.
        w13 = torch.stack([torch.cat([g.packed.reshape(-1), u.packed.reshape(-1)]) for g, u, _ in kernels])
        s13 = torch.stack([torch.cat([g.scale, u.scale]) for g, u, _ in kernels])
        z13 = None
        if gate.zz is not None:
            z13 = torch.stack([torch.cat([g.zz, u.zz]) for g, u, _ in kernels])  # type: ignore[list-item]
        w2 = torch.stack([d.packed.reshape(-1) for _, _, d in kernels])
        s2 = torch.stack([d.scale for _, _, d in kernels])
        z2 = None if down.zz is None else torch.stack([d.zz for _, _, d in kernels])  # type: ignore[misc]
        # Act-order: packed column c of gate / up reads input perm[c]; intermediate feature i
        # sits at the down projection's packed column argsort(perm)[i].
        perm13, pos2 = act_order_tables(kernels, self.hidden, self.inter)
        gate_off = _stack_offsets([g for g, _, _ in kernels])
        off13 = None
        if gate_off is not None:
            up_off = _stack_offsets([u for _, u, _ in kernels])
            assert up_off is not None
            off13 = torch.stack([gate_off, up_off], dim=1)  # [E, 2, groups, inter]
        off2 = _stack_offsets([d for _, _, d in kernels])
        # Every expert's own kernel now reads its slice of the stacks: one copy of the weights.
        for e, (g, u, d) in enumerate(kernels):
            if off13 is not None and g.offset_t is not None and u.offset_t is not None:
                g.offset_t, u.offset_t = off13[e, 0], off13[e, 1]
            if off2 is not None and d.offset_t is not None:
                d.offset_t = off2[e]
            half = g.packed.numel()
            g.packed, u.packed = (w13[e, :half].view(g.packed.shape), w13[e, half:].view(u.packed.shape))
            nb = g.scale.shape[0]
            g.scale, u.scale = s13[e, :nb], s13[e, nb:]
            if z13 is not None:
                g.zz, u.zz = z13[e, :nb], z13[e, nb:]
            d.packed, d.scale = w2[e].view(d.packed.shape), s2[e]
            if z2 is not None:
                d.zz = z2[e]
        self.register_buffer("w13", w13, persistent=False)
        self.register_buffer("s13", s13, persistent=False)
        self.register_buffer("z13", z13, persistent=False)
        self.register_buffer("w2", w2, persistent=False)
        self.register_buffer("s2", s2, persistent=False)
        self.register_buffer("z2", z2, persistent=False)
        self.register_buffer("lut", gate.lut, persistent=False)
        self.register_buffer("perm13", perm13, persistent=False)
        self.register_buffer("pos2", pos2, persistent=False)
        self.register_buffer("off13", off13, persistent=False)
        self.register_buffer("off2", off2, persistent=False)
        # fp8 activations: x quantized once here for every expert's gate and up (a dynamic scale
        # depends on x alone; a static one is shared, cannot_fuse checked), h inside the call.
        self.act = gate.spec.act
        self.register_buffer(
            "act_scale13", gate.input_scale if self.act is not None else None, persistent=False
        )
        scale2 = None
        if self.act is not None and not self.act.dynamic:
            scale2 = torch.stack([d.input_scale.float().reshape(()) for _, _, d in kernels])  # type: ignore[union-attr]
        self.register_buffer("act_scale2", scale2, persistent=False)

    @property
    def num_experts(self) -> int:
        return int(self.w13.shape[0])

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        act = self.act
        x_scale = None
        if act is not None and act.type == "int8":
            # The integer codes (exact in bf16) go in; their scale multiplies the gate / up outputs.
            codes, scale, _ = _quantize_int8_activations(
                x, act.dynamic, self.act_scale13, None, act.scale_divisor or 127.0
            )
            x, x_scale = codes, scale.float().reshape(-1).expand(x.shape[0]).contiguous()
        elif act is not None:
            x = fake_quantize_activations(x, act, self.act_scale13)
        x = x.to(self.compute_dtype)
        if self.k_pad != self.hidden:
            x = torch.nn.functional.pad(x, (0, self.k_pad - self.hidden))
        return getattr(cpu_ext.ops(), self.op_name)(
            x,
            ids.to(torch.int64),
            weights.to(torch.float32),
            self.w13,
            self.s13,
            self.z13,
            self.w2,
            self.s2,
            self.z2,
            self.lut,
            self.fmt,
            self.group13,
            self.group2,
            self.inter,
            self.hidden,
            self.perm13,
            self.pos2,
            self.off13,
            self.off2,
            0 if act is None else _ACT_CODES[act.type],
            0.0 if act is None else float(act.scale_divisor or _act_top(act.type)),
            0.0 if act is None else _act_top(act.type),
            act.group_size if act is not None and act.granularity == "group" else 0,
            self.act_scale2,
            x_scale,
        )

    def extra_repr(self) -> str:
        extras = [n for n in ("perm13", "pos2", "off13", "off2") if getattr(self, n) is not None]
        text = f"{self.op_name}, experts={self.num_experts}, inter={self.inter}, hidden={self.hidden}, {self.compute_dtype}"
        return text + "".join(f", {n}" for n in extras)


def _act_top(act_type: str) -> float:
    return 127.0 if act_type == "int8" else float(FP8_MAX[act_type])
