"""cuda_int4_tinygemm: uint4 (and uint2/uint3) weights through torch's tinygemm kernel,
`aten._weight_int4pack_mm` on bfloat16 activations, with `aten._convert_weight_to_int4pack`
packing on the GPU at load.

tinygemm computes w = (q - 8) * scale + zero per group from bf16 (scale, zero) pairs
[K / group, N, 2], accumulating in fp32. Our canonical (q - z) * s is the same with
zero = (8 - z) * s, formed in fp32 and rounded once to bf16; zero points are first moved to 8
wherever a group's codes allow (`_recenter`, shared with the CPU int4 kernel), which makes that
term exactly 0 for symmetric and uint2/uint3 weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from anyquant.quant.kernels.base import check_weight, round_up
from anyquant.quant.kernels.cuda.base import CudaKernel, finish, on_host
from anyquant.quant.kernels.torch_cpu.int4 import _act_order_permutation, _recenter
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups

# The group sizes tinygemm takes; a larger group that is a multiple of one is that group
# repeated (the scale duplicated), which is exact.
OP_GROUPS = (256, 128, 64, 32)
# inner_k_tiles of the packed layout: K must be a multiple of 16 * INNER_K_TILES.
INNER_K_TILES = 8
K_ALIGN = 16 * INNER_K_TILES
N_ALIGN = 8


@dataclass
class TinygemmOperands:
    """What `_convert_weight_to_int4pack` and the mm op take, built on any device."""

    codes_u8: Tensor  # uint8 [Npad, Kpad / 2]: column 2j in the high nibble, 2j + 1 in the low
    scales_and_zeros: Tensor  # bf16 [Kpad / op_group, Npad, 2]
    perm: Tensor | None  # act-order column permutation of the input
    op_group: int
    n_pad: int
    k_pad: int


def tinygemm_operands(w: QuantWeight) -> TinygemmOperands:
    """The canonical weight in tinygemm's form (pure torch: runs, and is tested, on CPU)."""
    spec, (n, k) = w.spec, w.shape
    if spec.granularity == "group":
        group, ng = spec.group_size, num_groups(k, spec.group_size)
    else:  # channel: one group spanning the (padded) row
        group, ng = round_up(k, K_ALIGN), 1
    op_group = next(g for g in OP_GROUPS if group % g == 0)  # `rejects` ruled out the others
    k_pad = round_up(ng * group, math.lcm(group, K_ALIGN))  # whole groups and whole K tiles
    n_pad = round_up(n, N_ALIGN)
    dev = w.data.device
    codes = w.data.to(torch.int32)
    perm = None
    if spec.act_order:
        perm = _act_order_permutation(on_host(w.group_index), group, k).to(dev)
        codes = codes[:, perm]
    zero = w.zero.reshape(n, ng).to(torch.int32) if w.zero is not None else None
    if zero is None:
        zero = torch.full((n, ng), spec.implicit_zero, dtype=torch.int32, device=dev)
    # Padded columns hold their group's zero point (weight 0); padded groups and rows hold 8
    # with scale 0. All meet zero inputs or are sliced off anyway.
    ng_pad = k_pad // group
    padded = torch.full((n_pad, k_pad), 8, dtype=torch.int32, device=dev)
    zero_p = torch.full((n_pad, ng_pad), 8, dtype=torch.int32, device=dev)
    zero_p[:n, :ng] = zero
    padded[:n, : ng * group] = zero.repeat_interleave(group, dim=1)
    padded[:n, :k] = codes
    grouped = padded.view(n_pad, ng_pad, group)
    shifted = _recenter(grouped, zero_p)
    grouped += (shifted - zero_p)[:, :, None]
    scale = torch.zeros(n_pad, ng_pad, dtype=torch.float32, device=dev)
    scale[:n, :ng] = w.scale.reshape(n, ng).float()
    offset = (8 - shifted).float() * scale  # fp32, rounded once to bf16 below
    sz = torch.stack((scale, offset), dim=-1).repeat_interleave(
        group // op_group, dim=1
    )  # [Npad, Kpad/og, 2]
    codes_u8 = ((padded[:, 0::2] << 4) | padded[:, 1::2]).to(torch.uint8)
    return TinygemmOperands(
        codes_u8, sz.transpose(0, 1).contiguous().to(torch.bfloat16), perm, op_group, n_pad, k_pad
    )


@register_kernel
class CudaInt4TinygemmKernel(CudaKernel):
    name = "cuda_int4_tinygemm"
    priority = 60
    compute_dtypes: ClassVar[tuple[torch.dtype, ...] | None] = (torch.bfloat16,)
    min_capability = (8, 0)
    why_capability = "tinygemm runs on bf16 tensor cores"
    packed: Tensor
    scales_and_zeros: Tensor
    perm: Tensor | None

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        if spec.traits.cpu_layout != "int4":
            return f"weights are {spec.weight}; tinygemm runs uint4 (and uint2/uint3) codes"
        if spec.act is not None:
            return f"activations are quantized ({spec.act.describe()}); tinygemm is weight-only"
        if spec.granularity == "group" and not any(spec.group_size % g == 0 for g in OP_GROUPS):
            return f"group size {spec.group_size} is not a multiple of 32 (tinygemm takes 32, 64, 128, 256)"
        if spec.granularity not in ("group", "channel"):
            return f"{spec.granularity} scales; tinygemm takes group or channel scales"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        ops = tinygemm_operands(check_weight(weight, self))
        self.op_group, self.k_pad = ops.op_group, ops.k_pad
        packed = torch.ops.aten._convert_weight_to_int4pack(ops.codes_u8.contiguous(), INNER_K_TILES)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", ops.scales_and_zeros, persistent=False)
        self.register_buffer("perm", ops.perm, persistent=False)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if x.shape[1] != self.k_pad:
            x = F.pad(x, (0, self.k_pad - x.shape[1]))
        y = torch.ops.aten._weight_int4pack_mm(
            x.to(torch.bfloat16).contiguous(), self.packed, self.op_group, self.scales_and_zeros
        )
        return finish(y, n, bias, self.compute_dtype)
