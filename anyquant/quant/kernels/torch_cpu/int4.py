"""cpu_int4: uint4 (and uint2/uint3) weights in torch's int4pack layout, torch's fused op or chunks."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from anyquant.errors import TensorError, UnsupportedError
from anyquant.quant.kernels.base import check_weight, round_up
from anyquant.quant.kernels.torch_cpu.chunking import (
    _CHUNK_ELEMENTS,
    TorchCpuKernel,
    _finish,
    _fused_ops_vectorized,
    _pad_columns,
    _padded_bias,
    _round_to,
    _Scratch,
)
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups

# Token counts up to which torch's fused weight-only ops beat dequantize-then-matmul (bfloat16,
# measured by benchmarks/linear_kernels.py on Qwen2.5-0.5B shapes): the fused ops redo the dequantization
# for every 4 tokens and do not use AMX, so their cost grows linearly with T.
_INT4_FUSED_MAX_TOKENS = 64

# Up to this many tokens the int4 unpacking path multiplies plane tiles separately (no transpose
# of the dequantized weights); above it, one large matmul amortizes the transpose.
_INT4_TILE_MAX_TOKENS = 64

# The int4 mm op takes these group sizes; a larger group that is a multiple of one of them is
# the same group repeated (the scale is duplicated), which is exact.
_INT4_OP_GROUPS = (256, 128, 64, 32)


@functools.cache
def _int4pack_layout() -> tuple[int, bool] | None:
    """How `_convert_weight_to_int4pack_for_cpu` lays out full blocks of rows on this CPU.

    Returns (rows per block, split) or None if the layout is none we know. Per block, the bytes
    are [K, block/2]: byte j holds rows (j, j + block/2) when split, else rows (2j, 2j + 1), low
    nibble first. The layout depends on the ISA torch dispatches to (AVX512: 64 split, AVX2: 32
    split, scalar: 32 pairs), so it is checked with a probe rather than assumed.
    """
    n, k = 128, 4  # a multiple of every candidate block size: every block is full
    codes = ((torch.arange(n * k) * 7 + 3) % 16).reshape(n, k).to(torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except (RuntimeError, AttributeError):
        return None
    got = packed.reshape(-1)
    for block_n, split in ((64, True), (32, True), (32, False), (64, False)):
        c = codes.to(torch.uint8).reshape(n // block_n, block_n, k).transpose(1, 2)  # [NB, K, block]
        lo, hi = (c[..., : block_n // 2], c[..., block_n // 2 :]) if split else (c[..., 0::2], c[..., 1::2])
        if torch.equal((lo | (hi << 4)).reshape(-1), got):
            return block_n, split
    return None


def _act_order_permutation(group_index: Tensor | None, group_size: int, k: int) -> Tensor:
    """perm such that columns perm[j] form contiguous groups of `group_size`; else UnsupportedError."""
    if group_index is None or group_index.shape != (k,):
        raise TensorError("g_idx", f"act-order needs a group index of shape [{k}]")
    perm = torch.argsort(group_index.long(), stable=True)
    expected = torch.arange(k) // group_size
    if not torch.equal(group_index.long()[perm], expected):
        counts = torch.bincount(group_index.long(), minlength=num_groups(k, group_size))
        bad = int(torch.nonzero(counts != torch.bincount(expected, minlength=counts.numel()))[0, 0])
        raise UnsupportedError(
            f"act-order group index puts {int(counts[bad])} input channels in group {bad}; "
            f"the int4 kernel needs exactly {group_size} per group (all but a last partial group) "
            "to permute them into contiguous groups. Run this model with --kernel reference."
        )
    return perm


def _recenter(grouped: Tensor, zero: Tensor) -> Tensor:
    """Zero points as close to 8 as the codes allow: [N, ng, G] codes, [N, ng] zeros -> new zeros.

    Adding z' - z to every code of a group and using z' as its zero point changes no weight
    ((q - z) * s is unchanged) as long as the codes stay in [0, 15]. torch's int4 op forms
    (q - 8) * s + (8 - z') * s with the offset rounded to the compute dtype, so z' = 8 removes
    that rounding: always possible for uint2/uint3 and symmetric uint4, and for asymmetric
    groups whose codes leave room.
    """
    lowest = zero - grouped.amin(dim=2)  # smallest z' keeping codes >= 0
    highest = zero + 15 - grouped.amax(dim=2)  # largest z' keeping codes <= 15
    return torch.minimum(torch.maximum(torch.full_like(zero, 8), lowest), highest)


@register_kernel
class CpuInt4Kernel(TorchCpuKernel):
    """uint4 (also uint2/uint3) with channel or group scales, sym or asym, act-order.

    Storage: torch's int4pack layout (0.5 byte per weight) plus per-group scales and zero points.
    bfloat16 with group sizes a multiple of 32 and at most `_INT4_FUSED_MAX_TOKENS` tokens runs
    `_weight_int4pack_mm_for_cpu`; everything else unpacks chunks of rows from the same bytes and
    multiplies (float32 and float16 always do: the op's kernels for them are scalar loops on x86).

    Rounding in the fused op: it computes (q - 8) * scale + offset in fp32 from a scale and an
    offset stored in the compute dtype (bfloat16). The offset (8 - zero) * scale is formed in fp32
    and rounded once to bfloat16, so each weight of a group whose zero point is not 8 carries an
    extra absolute error of up to |8 - zero| * scale * 2^-9, and the scale itself is rounded to
    bfloat16 (exact when the checkpoint stores bf16 scales). `_recenter` moves zero points to 8
    wherever the codes allow, which removes the offset for uint2/uint3 and symmetric uint4.
    The unpacking path computes (q - zero) * scale in fp32 and rounds once, like the reference.
    """

    name = "cpu_int4"
    priority = 50
    # Buffers (declared for the type checker; set in load).
    packed: Tensor  # int4pack bytes of [Npad, Kpad] codes
    perm: Tensor | None  # act-order column permutation
    scale_u: Tensor  # fp32 [2, NB, ng, 1, block/2] (see _unpacked_layout)
    zero_u: Tensor | None  # same layout; None when every zero point is 8
    scales_and_zeros: Tensor | None  # [Kpad / op_group, Npad, 2] bf16, fused op only

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        if spec.traits.cpu_layout != "int4":
            return f"weights are {spec.weight}; this kernel runs uint4 (and uint2/uint3) codes"
        if spec.act is not None:
            return f"activations are quantized ({spec.act.describe()}); this kernel is weight-only"
        if _int4pack_layout() is None:
            return "this torch build packs int4 weights in a layout the kernel cannot unpack"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = check_weight(weight, self)
        spec = w.spec
        n, k = self.shape
        layout = _int4pack_layout()
        if layout is None:
            raise UnsupportedError("cpu_int4: unknown int4pack layout on this torch build")
        self.block_n, self.split = layout
        if spec.granularity == "group":
            group, ng = spec.group_size, num_groups(k, spec.group_size)
        else:  # channel: one group spanning the row, padded to a multiple of 32 for the op
            group, ng = round_up(k, 32), 1
        self.group, self.k_pad, self.n_pad = group, ng * group, round_up(n, self.block_n)

        codes = w.data
        perm = None
        if spec.act_order:
            perm = _act_order_permutation(w.group_index, group, k)
            codes = codes[:, perm]
        self.register_buffer("perm", perm, persistent=False)
        zero = w.zero.reshape(n, ng).to(torch.int32) if w.zero is not None else None
        if zero is None:
            zero = torch.full((n, ng), spec.implicit_zero, dtype=torch.int32)
        padded, zero_p = self._padded_codes(codes, zero)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1), persistent=False
        )
        del padded

        scale_p = torch.zeros(self.n_pad, ng)
        scale_p[:n] = w.scale.reshape(n, ng).float()
        self.register_buffer("scale_u", self._unpacked_layout(scale_p), persistent=False)
        all_eight = bool((zero_p == 8).all())
        zero_u = None if all_eight else self._unpacked_layout(zero_p.float())
        self.register_buffer("zero_u", zero_u, persistent=False)

        self.op_group = next((g for g in _INT4_OP_GROUPS if group % g == 0), 0)
        self.fused = bool(self.op_group) and self.compute_dtype == torch.bfloat16 and _fused_ops_vectorized()
        scales_and_zeros = None
        if self.fused:
            offset = (8 - zero_p).float() * scale_p  # fp32, rounded once below
            sz = torch.stack((scale_p, offset), dim=-1)  # [Npad, ng, 2]
            sz = sz.repeat_interleave(group // self.op_group, dim=1)  # [Npad, Kpad / op_group, 2]
            scales_and_zeros = sz.transpose(0, 1).contiguous().to(self.compute_dtype)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def _padded_codes(self, codes: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        """[N, K] codes and [N, ng] zeros -> int32 [Npad, Kpad] codes and [Npad, ng] zeros, re-centered.

        Padded rows: code = zero = 8 with scale 0 (their outputs are sliced off). Padded columns:
        code = the group's zero point (weight 0), and they meet zero inputs anyway.
        """
        n, k = codes.shape
        ng = zero.shape[1]
        padded = torch.full((self.n_pad, self.k_pad), 8, dtype=torch.int32)
        padded[:n] = zero.repeat_interleave(self.group, dim=1)
        padded[:n, :k] = codes
        zero_p = torch.full((self.n_pad, ng), 8, dtype=torch.int32)
        zero_p[:n] = zero
        grouped = padded.view(self.n_pad, ng, self.group)
        shifted = _recenter(grouped, zero_p)
        grouped += (shifted - zero_p)[:, :, None]  # in place: `padded` holds the shifted codes
        return padded, shifted

    def _planes(self, t: Tensor) -> Tensor:
        """View a [..., block] row-block axis as [2, ..., block/2]: rows of low / high nibbles."""
        half = self.block_n // 2
        if self.split:  # byte j holds rows j and j + block/2
            return t.unflatten(-1, (2, half)).movedim(-2, 0)
        return t.unflatten(-1, (half, 2)).movedim(-1, 0)  # byte j holds rows 2j and 2j + 1

    def _unpacked_layout(self, per_group: Tensor) -> Tensor:
        """[Npad, ng] -> [2, NB, ng, 1, block/2], matching unpacked codes [2, NB, ng, G, block/2]."""
        ng = per_group.shape[1]
        blocks = per_group.reshape(self.n_pad // self.block_n, self.block_n, ng).transpose(1, 2)
        return self._planes(blocks).unsqueeze(3).contiguous()

    def _dequant_planes(self, b0: int, b1: int, scratch: _Scratch) -> Tensor:
        """Row blocks b0..b1 as fp32 planes [2, nb, Kpad, block/2]: tiles of W.T, one per nibble.

        Torch's packed block is [Kpad, block/2] bytes; low and high nibbles are unpacked into two
        contiguous planes because contiguous elementwise ops are the fast ones on CPU.
        """
        kp, nb, group, half = self.k_pad, b1 - b0, self.group, self.block_n // 2
        planes = (2, nb, kp // group, group, half)
        p = self.packed.reshape(-1)[b0 * kp * half : b1 * kp * half].reshape(nb, kp, half)
        codes = scratch.get("codes", (2, nb, kp, half), torch.uint8)
        torch.bitwise_and(p, 15, out=codes[0])
        torch.bitwise_right_shift(p, 4, out=codes[1])
        w = scratch.get("fp32", planes, torch.float32).copy_(codes.view(planes))
        # (q - zero) is exact in fp32; one multiply and one rounding, as in the reference.
        w.sub_(self.zero_u[:, b0:b1] if self.zero_u is not None else 8.0)
        return w.mul_(self.scale_u[:, b0:b1]).view(2, nb, kp, half)

    def _unpacked_mm(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x [T, Kpad] @ W.T + bias -> [T, Npad], one chunk of row blocks unpacked at a time."""
        blocks, bn = self.n_pad // self.block_n, self.block_n
        per_chunk = max(1, _CHUNK_ELEMENTS // (self.k_pad * bn))
        out = x.new_empty(x.shape[0], self.n_pad)
        scratch = _Scratch()
        for b0 in range(0, blocks, per_chunk):
            b1 = min(blocks, b0 + per_chunk)
            cols = slice(b0 * bn, b1 * bn)
            planes = self._dequant_planes(b0, b1, scratch)
            chunk_bias = None if bias is None else bias[cols]
            if x.shape[0] <= _INT4_TILE_MAX_TOKENS:
                self._tiles_mm(x, planes, chunk_bias, out[:, cols], scratch)
            else:
                self._transposed_mm(x, planes, chunk_bias, out[:, cols], scratch)
        return out

    def _tiles_mm(
        self, x: Tensor, planes: Tensor, bias: Tensor | None, out: Tensor, scratch: _Scratch
    ) -> None:
        """Few tokens: one small matmul per plane tile, then a shuffle of the (small) output."""
        t, (_, nb, kp, half) = x.shape[0], planes.shape
        tiles = _round_to(planes, self.compute_dtype, scratch).view(2 * nb, kp, half)
        xs = x.expand(2 * nb, t, kp)
        if bias is None:
            y = torch.bmm(xs, tiles)
        else:  # bias inside the matmul: the output is rounded once
            y = torch.baddbmm(self._planes(bias.view(nb, -1)).reshape(2 * nb, 1, half), xs, tiles)
        self._planes(out.view(t, nb, -1)).copy_(y.view(2, nb, t, half).transpose(1, 2))

    def _transposed_mm(
        self, x: Tensor, planes: Tensor, bias: Tensor | None, out: Tensor, scratch: _Scratch
    ) -> None:
        """Many tokens: write the tiles into W.T's column order once, then one large matmul."""
        _, nb, kp, _ = planes.shape
        wt = scratch.get("wt", (kp, nb, self.block_n), self.compute_dtype)
        self._planes(wt).transpose(1, 2).copy_(planes)  # rounds once to the compute dtype
        wt2 = wt.view(kp, nb * self.block_n)
        out.copy_(x @ wt2 if bias is None else torch.addmm(bias, x, wt2))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        x = _pad_columns(x, self.k_pad)
        if self.fused and x.shape[0] <= _INT4_FUSED_MAX_TOKENS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.op_group, self.scales_and_zeros
            )
            return _finish(y, n, bias)
        y = self._unpacked_mm(x, _padded_bias(bias, self.n_pad, self.compute_dtype))
        return _finish(y, n, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}, fused={getattr(self, 'fused', False)}"
