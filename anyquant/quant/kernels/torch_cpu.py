"""Fast CPU kernels built on stock PyTorch ops: int4 and int8 weight-only, W8A8 int8, fp8 weights.

Owns the CPU layouts (torch's int4pack, int8 codes, fp8 bytes), the repacking at load, and the
per-call choice between torch's fused weight-only ops (fast for a few tokens, but vectorized only
for bfloat16 on x86) and a chunked dequantize-then-matmul path (any dtype, any token count). It
does not define numerics: the reference kernel does, and tests/kernels/test_cpu_kernels.py holds
every kernel here to it. Every rejection is a sentence, because `anyquant inspect` prints it.
"""

from __future__ import annotations

import functools
import math
import platform
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from anyquant.errors import TensorError, UnsupportedError
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.reference import fake_quantize_activations
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import MATMUL_KINDS, LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Weights dequantized per chunk of output rows in the dequantize-then-matmul path: small enough
# that a chunk (fp32) stays in L2, large enough that the per-op overhead is amortized.
_CHUNK_ELEMENTS = 1 << 18

# Token counts up to which torch's fused weight-only ops beat dequantize-then-matmul (bfloat16,
# measured by benchmarks/linear_kernels.py on Qwen2.5-0.5B shapes): the fused ops redo the dequantization
# for every 4 tokens and do not use AMX, so their cost grows linearly with T.
_INT4_FUSED_MAX_TOKENS = 64
_INT8_FUSED_MAX_TOKENS = 32
# Up to this many tokens the int4 unpacking path multiplies plane tiles separately (no transpose
# of the dequantized weights); above it, one large matmul amortizes the transpose.
_INT4_TILE_MAX_TOKENS = 64

# The int4 mm op takes these group sizes; a larger group that is a multiple of one of them is
# the same group repeated (the scale is duplicated), which is exact.
_INT4_OP_GROUPS = (256, 128, 64, 32)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _common_reason(
    spec: QuantSpec | None,
    kind: LayerKind,
    device: torch.device,
    shape: tuple[int, int],
    compute_dtype: torch.dtype,
) -> str | None:
    """Rejections shared by every kernel in this module."""
    if device.type != "cpu":
        return f"runs on CPU only, the layer is on {device.type}"
    if spec is None:
        return "layer is unquantized (the dense kernel runs it)"
    if kind == "router":
        return "MoE routers keep the reference kernel's fp32 dequantize-then-matmul (routing flips on tiny differences)"
    if kind not in MATMUL_KINDS:
        return f"{kind} layers are not matrix multiplications"
    if compute_dtype not in _FLOAT_DTYPES:
        return f"compute dtype {compute_dtype} is not float32, bfloat16 or float16"
    if min(shape) <= 0:
        return f"layer shape {list(shape)} has no weights"
    if spec.has_offset:
        return "float offsets per group (GGUF minimums) are not applied by these torch ops"
    return None


def _fused_ops_vectorized() -> bool:
    """Whether torch's int4/int8 weight-only mm ops have a vectorized bfloat16 path on this CPU."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _check_weight(weight: QuantWeight | Tensor, kernel: LinearKernel) -> QuantWeight:
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


def _finish(y: Tensor, n: int, bias: Tensor | None) -> Tensor:
    """Drop padded output columns and add the bias (None when the matmul already added it)."""
    if y.shape[1] != n:
        y = y[:, :n].contiguous()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _padded_bias(bias: Tensor | None, n_pad: int, dtype: torch.dtype) -> Tensor | None:
    if bias is None:
        return None
    bias = bias.to(dtype)
    return F.pad(bias, (0, n_pad - bias.shape[0])) if bias.shape[0] < n_pad else bias


def _pad_columns(x: Tensor, k_pad: int) -> Tensor:
    """x [T, K] -> [T, k_pad] with zero columns; zero inputs make padded weights contribute nothing."""
    if x.shape[1] == k_pad:
        return x.contiguous()
    return F.pad(x, (0, k_pad - x.shape[1]))


def _aligned(x: Tensor) -> Tensor:
    """The fused int8 op loads rows of x with aligned vector loads; copy a misaligned view."""
    return x if x.data_ptr() % 64 == 0 else x.clone()


class _Scratch:
    """Flat buffers reused by every chunk of one call.

    A fresh allocation of a megabyte-sized chunk page-faults on first touch; reusing one buffer
    per role across the chunks of a call avoids most of that. One Scratch per call, never shared.
    """

    def __init__(self) -> None:
        self._flat: dict[str, Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        size = math.prod(shape)
        flat = self._flat.get(role)
        if flat is None or flat.numel() < size or flat.dtype != dtype:
            flat = self._flat[role] = torch.empty(size, dtype=dtype)
        return flat[:size].view(shape)


def _chunked_linear(
    x: Tensor,
    n_rows: int,
    rows_per_chunk: int,
    dense_rows: Callable[[int, int, _Scratch], Tensor],
    bias: Tensor | None,
) -> Tensor:
    """x [T, K] @ W.T + bias -> [T, n_rows]; dense_rows(r0, r1, scratch) gives W[r0:r1] in x's dtype.

    Only one chunk of dequantized rows exists at a time, so the layer keeps its packed size. The
    bias (padded to n_rows) is added inside the matmul, so the output is rounded once.
    """
    out = x.new_empty(x.shape[0], n_rows)
    scratch = _Scratch()
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        out[:, r0:r1] = F.linear(x, dense_rows(r0, r1, scratch), None if bias is None else bias[r0:r1])
    return out


def _round_to(w: Tensor, dtype: torch.dtype, scratch: _Scratch) -> Tensor:
    """The fp32 chunk `w` rounded once to `dtype` (itself for float32)."""
    if dtype == torch.float32:
        return w
    return scratch.get("rounded", tuple(w.shape), dtype).copy_(w)


# ---------------------------------------------------------------------------------------------
# int4 (and 2/3-bit codes, which fit in 4 bits)
# ---------------------------------------------------------------------------------------------


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
class CpuInt4Kernel(LinearKernel):
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
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        reason = _common_reason(spec, kind, device, shape, compute_dtype)
        if reason is not None or spec is None:
            return reason
        if spec.traits.cpu_layout != "int4":
            return f"weights are {spec.weight}; this kernel runs uint4 (and uint2/uint3) codes"
        if spec.act is not None:
            return f"activations are quantized ({spec.act.describe()}); this kernel is weight-only"
        if _int4pack_layout() is None:
            return "this torch build packs int4 weights in a layout the kernel cannot unpack"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = _check_weight(weight, self)
        spec = w.spec
        n, k = self.shape
        layout = _int4pack_layout()
        if layout is None:
            raise UnsupportedError("cpu_int4: unknown int4pack layout on this torch build")
        self.block_n, self.split = layout
        if spec.granularity == "group":
            group, ng = spec.group_size, num_groups(k, spec.group_size)
        else:  # channel: one group spanning the row, padded to a multiple of 32 for the op
            group, ng = _round_up(k, 32), 1
        self.group, self.k_pad, self.n_pad = group, ng * group, _round_up(n, self.block_n)

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


# ---------------------------------------------------------------------------------------------
# int8 weight-only (W8A16)
# ---------------------------------------------------------------------------------------------


@register_kernel
class CpuInt8WeightKernel(LinearKernel):
    """int8 symmetric per-channel or per-tensor weights (and uint8 symmetric per-channel).

    uint8 with the implicit zero 128 is stored as int8 code - 128, which is exact. bfloat16 with
    at most `_INT8_FUSED_MAX_TOKENS` tokens runs `_weight_int8pack_mm` (scale rounded to bfloat16,
    fp32 accumulation); otherwise chunks of rows are dequantized in fp32, rounded once and
    multiplied. Stored: 1 byte per weight and one fp32 scale per row.
    """

    name = "cpu_int8_weight"
    priority = 50
    codes: Tensor  # int8 [N, Kpad]
    scale: Tensor  # fp32 [N]
    scale_op: Tensor | None  # compute dtype [N], fused op only

    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        reason = _common_reason(spec, kind, device, shape, compute_dtype)
        if reason is not None or spec is None:
            return reason
        if spec.traits.cpu_layout != "int8":
            return f"weights are {spec.weight}; this kernel runs int8 and uint8"
        if spec.act is not None:
            return f"activations are quantized ({spec.act.describe()}); this kernel is weight-only"
        if spec.has_zero:
            return "asymmetric (zero points): (code - zero) does not fit int8 in general"
        if spec.granularity == "group":
            return f"group scales (group {spec.group_size}); the int8 mm op has one scale per output channel"
        if spec.granularity not in ("channel", "tensor"):
            return f"{spec.granularity} scales; this kernel takes per-channel or per-tensor scales"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = _check_weight(weight, self)
        n, k = self.shape
        codes = w.data
        if w.spec.weight == "uint8":  # implicit zero 128: code - 128 is in [-128, 127], exact
            codes = (codes.to(torch.int16) - w.spec.implicit_zero).to(torch.int8)
        # The fused op steps through K 16 at a time with aligned loads: pad K to 64 with zeros.
        self.k_pad = _round_up(k, 64)
        padded = torch.zeros(n, self.k_pad, dtype=torch.int8)
        padded[:, :k] = codes
        self.register_buffer("codes", padded, persistent=False)
        scale = w.scale.float().reshape(-1).expand(n).contiguous()  # tensor scale -> every row
        self.register_buffer("scale", scale, persistent=False)
        self.fused = self.compute_dtype == torch.bfloat16 and _fused_ops_vectorized()
        self.register_buffer(
            "scale_op", scale.to(self.compute_dtype) if self.fused else None, persistent=False
        )

    def _dense_rows(self, r0: int, r1: int, scratch: _Scratch) -> Tensor:
        w = scratch.get("fp32", (r1 - r0, self.k_pad), torch.float32).copy_(self.codes[r0:r1])
        return _round_to(w.mul_(self.scale[r0:r1, None]), self.compute_dtype, scratch)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        x = _pad_columns(x, self.k_pad)
        if self.fused and x.shape[0] <= _INT8_FUSED_MAX_TOKENS:
            y = torch.ops.aten._weight_int8pack_mm(_aligned(x), self.codes, self.scale_op)
            return _finish(y, n, bias)
        bias = None if bias is None else bias.to(self.compute_dtype)
        y = _chunked_linear(x, n, max(1, _CHUNK_ELEMENTS // self.k_pad), self._dense_rows, bias)
        return _finish(y, n, None)


# ---------------------------------------------------------------------------------------------
# W8A8 int8: int8 weights x int8 activations, int32 accumulation
# ---------------------------------------------------------------------------------------------


def _quantize_int8_activations(
    x: Tensor,
    token: bool,
    input_scale: Tensor | None,
    input_zero: Tensor | None,
    divisor: float = 127.0,
    amax: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """x [T, K] -> (codes int8 [T, K], scale fp32 [T, 1] or [1, 1], zero point or None).

    The same operations in the same order as anyquant.quant.reference.fake_quantize_activations,
    so codes * scale equal the reference's fake-quantized activations bit for bit. `amax`: a
    precomputed dynamic amax ([T, 1] or [1, 1]) used instead of x's own.
    """
    xf = x.float()
    zero = None
    if input_scale is not None:
        scale = input_scale.float().reshape(1, 1)
        q = torch.round(xf / scale)
        if input_zero is not None:
            zero = input_zero.float().reshape(1, 1)
            q = q + zero
    else:
        if amax is None:
            amax = xf.abs().amax(dim=-1, keepdim=True) if token else xf.abs().amax().reshape(1, 1)
        # An all-zero row has amax 0; clamp so 0/0 never makes NaN.
        scale = amax.clamp(min=1e-10) / divisor  # ActQuant.scale_divisor (127.5 for compressed-tensors)
        q = torch.round(xf / scale)
    return q.clamp_(-128.0, 127.0).to(torch.int8), scale, zero


@register_kernel
class CpuW8A8Int8Kernel(LinearKernel):
    """int8 symmetric per-channel/per-tensor weights with int8 activations, via `torch._int_mm`.

    Activations: dynamic per-token, dynamic per-tensor, or static per-tensor (input_scale and
    optional input_zero), quantized exactly like the reference. The int32 accumulation is exact;
    scales are applied once in fp32: y = acc * s_x * s_w, so the result equals the reference up
    to fp32 rounding (the reference multiplies dequantized fp32 operands).
    """

    name = "cpu_w8a8_int8"
    priority = 50
    codes: Tensor  # int8 [N, K]
    scale: Tensor  # fp32 [N]
    input_scale: Tensor | None  # static activation scale
    input_zero: Tensor | None  # static activation zero point (int32)
    colsum: Tensor | None  # int32 [N], sum of each row's codes, with input_zero only

    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        reason = _common_reason(spec, kind, device, shape, compute_dtype)
        if reason is not None or spec is None:
            return reason
        if spec.weight != "int8" or spec.has_zero:
            what = f"{spec.weight} {'asym' if spec.has_zero else 'sym'}"
            return f"weights are {what}; this kernel runs symmetric int8"
        if spec.granularity not in ("channel", "tensor"):
            return f"{spec.granularity} weight scales; this kernel takes per-channel or per-tensor scales"
        act = spec.act
        if act is None:
            return "activations are not quantized (weight-only int8 runs on cpu_int8_weight)"
        if act.type != "int8":
            return f"activations are {act.type}; this kernel quantizes them to int8"
        if act.granularity == "group":
            return f"per-group activation scales (group {act.group_size}) need one int32 sum per group"
        if not act.dynamic and act.granularity != "tensor":
            return f"static per-{act.granularity} activation scales; static scales must be per-tensor"
        if shape[1] >= 1 << 17:
            return f"in_features {shape[1]} could overflow the int32 accumulator (limit 131072)"
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return "oneDNN is unavailable or disabled; torch._int_mm would use its scalar loop"
        if not getattr(torch.cpu, "_is_vnni_supported", lambda: False)():
            return "the CPU lacks AVX512-VNNI; torch._int_mm would use its scalar loop"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = _check_weight(weight, self)
        n, _ = self.shape
        act = w.spec.act
        if act is None:
            raise TypeError("cpu_w8a8_int8 needs an activation-quantized spec")
        self.register_buffer("codes", w.data.contiguous(), persistent=False)  # [N, K] int8
        self.register_buffer("scale", w.scale.float().reshape(-1).expand(n).contiguous(), persistent=False)
        self.token = act.dynamic and act.granularity == "token"
        self.dynamic_act = act if act.dynamic else None
        self.divisor = act.scale_divisor or 127.0
        input_scale = input_zero = None
        if not act.dynamic:
            if w.input_scale is None:
                raise TensorError("input_scale", "static activation quantization needs an input scale")
            input_scale, input_zero = w.input_scale.float(), w.input_zero
        self.register_buffer("input_scale", input_scale, persistent=False)
        self.register_buffer("input_zero", input_zero, persistent=False)
        # With an activation zero point z: sum (q - z) c = sum q c - z * sum c, all in int32.
        colsum = w.data.to(torch.int32).sum(dim=1) if input_zero is not None else None
        self.register_buffer("colsum", colsum, persistent=False)

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        q, s_x, zero = _quantize_int8_activations(
            x, self.token, self.input_scale, self.input_zero, self.divisor, act_amax
        )
        acc = torch._int_mm(q, self.codes.T)  # [T, N] int32, exact
        if zero is not None and self.colsum is not None:
            acc = acc - zero.to(torch.int32) * self.colsum
        y = acc.to(torch.float32) * s_x * self.scale
        if bias is not None:  # in fp32, so the output is rounded once
            y = y + bias.float()
        return y.to(self.compute_dtype)


# ---------------------------------------------------------------------------------------------
# fp8 weights, dequantized in chunks (torch._scaled_mm on CPU is slower than a dense matmul)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _fp8_pair_table(dtype: torch.dtype) -> Tensor:
    """[65536] int64: the two fp32 values of each pair of adjacent fp8 bytes, from torch's cast.

    Looking up two codes at once halves the lookups; 512 KiB stays in L2. Built through the same
    int16 / int64 views that decode it, so it holds on either byte order.
    """
    single = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()  # NaN/Inf too
    pair_bytes = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(65536, 2)
    return single[pair_bytes.long()].contiguous().view(torch.int64).reshape(-1)


def _fp8_to_float32(codes: Tensor, scratch: _Scratch | None = None) -> Tensor:
    """fp8 [R, K] -> fp32 by table lookup, two codes at a time: exactly torch's cast, several
    times faster (torch's elementwise fp8 cast is a scalar loop on CPU)."""
    scratch = scratch or _Scratch()
    data = codes.reshape(-1).view(torch.uint8)
    if data.numel() % 2:  # one padding byte so the bytes pair up
        data = torch.cat((data, data.new_zeros(1)))
    pairs = data.view(torch.int16)
    index = scratch.get("index", (pairs.numel(),), torch.int32).copy_(pairs).bitwise_and_(0xFFFF)
    out = scratch.get("fp32", (data.numel(),), torch.float32)
    torch.index_select(_fp8_pair_table(codes.dtype), 0, index, out=out.view(torch.int64))
    return out[: codes.numel()].view(codes.shape)


@register_kernel
class CpuFp8DequantKernel(LinearKernel):
    """fp8 (e4m3 / e5m2) weights with tensor, channel or block scales; any activation spec.

    Keeps the fp8 bytes (1 byte per weight) and dequantizes chunks of output rows per call in
    fp32, rounding once to the compute dtype like the reference; activation-quantized specs apply
    the reference's own fake quantization. No whole-layer float copy is kept.
    """

    name = "cpu_fp8_dequant"
    priority = 50
    codes: Tensor  # fp8 [Npad, Kpad]
    scale: Tensor  # fp32 [Npad, 1] or block [ceil(N/Bn), ceil(K/Bk)]
    input_scale: Tensor | None
    input_zero: Tensor | None

    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        reason = _common_reason(spec, kind, device, shape, compute_dtype)
        if reason is not None or spec is None:
            return reason
        if spec.traits.cpu_layout != "fp8":
            return f"weights are {spec.weight}; this kernel runs fp8 weights"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = _check_weight(weight, self)
        spec = w.spec
        n, k = self.shape
        self.spec = spec
        bn, bk = spec.block_shape if spec.granularity == "block" else (1, k)
        # Block scales: pad to whole blocks so a chunk of rows reshapes into [rows/Bn, Bn, K/Bk, Bk].
        self.block = (bn, bk)
        self.n_pad, self.k_pad = _round_up(n, bn), _round_up(k, bk)
        codes = w.data
        if (self.n_pad, self.k_pad) != (n, k):
            codes = torch.zeros(self.n_pad, self.k_pad, dtype=w.data.dtype)
            codes[:n, :k] = w.data
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        if spec.granularity == "block":
            scale = w.scale.float()  # [ceil(N/Bn), ceil(K/Bk)]
        else:
            scale = w.scale.float().reshape(-1).expand(n).reshape(n, 1)
            scale = torch.cat((scale, scale.new_zeros(self.n_pad - n, 1))) if self.n_pad > n else scale
        self.register_buffer("scale", scale.contiguous(), persistent=False)
        self.register_buffer("input_scale", w.input_scale, persistent=False)
        self.register_buffer("input_zero", w.input_zero, persistent=False)
        self.dynamic_act = spec.act if spec.act is not None and spec.act.dynamic else None

    def _dense_rows(self, r0: int, r1: int, scratch: _Scratch) -> Tensor:
        w = _fp8_to_float32(self.codes[r0:r1], scratch)  # [rows, Kpad] fp32
        bn, bk = self.block
        if self.spec.granularity == "block":
            blocks = w.view((r1 - r0) // bn, bn, self.k_pad // bk, bk)
            blocks.mul_(self.scale[r0 // bn : r1 // bn, None, :, None])
        else:
            w.mul_(self.scale[r0:r1])
        return _round_to(w, self.compute_dtype, scratch)

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        act = self.spec.act
        if act is not None:
            x = fake_quantize_activations(x, act, self.input_scale, self.input_zero, act_amax)
            x = x.to(self.compute_dtype)
        x = _pad_columns(x, self.k_pad)
        rows = max(1, _CHUNK_ELEMENTS // self.k_pad)
        rows = _round_up(rows, self.block[0])
        y = _chunked_linear(x, self.n_pad, rows, self._dense_rows, _padded_bias(bias, self.n_pad, x.dtype))
        return _finish(y, n, None)
