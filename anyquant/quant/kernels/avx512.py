"""AVX-512 (AVX512_BF16) weight-only kernels from the C++ extension: int4, int8 and fp8 weights.

Owns the repacking of a canonical weight into the extension's layout (csrc/gemv.h
describes it: blocks of 16 output rows, inputs in pairs, one 64-byte chunk per 8 inputs of int4,
4 inputs of int8 or 2 x 2 inputs of fp8; per-(row, group) fp32 scales and optional zero points) and the
per-call choice between the extension's three paths:
  - the vector kernel (bf16 and fp32 with few rows): it streams the packed weights once,
    decodes them in registers to bf16 and multiplies with vdpbf16ps. fp32 x is split into three
    bf16 parts, so fp32 keeps fp32 accuracy;
  - the GEMM (bf16 with more rows, csrc/gemm_tile.h): weights decoded once per panel of 64
    output rows x ~128 inputs into an L1-resident bf16 buffer, multiplied by a register-blocked
    micro-kernel (6 rows x 64 outputs in 24 accumulators), scales applied per group in fp32;
  - the tile path (fp32 with many rows): tiles of 16 * `_TILE_BLOCKS` output rows dequantized to
    fp32 (exactly as the reference forms them) and multiplied by at::mm (oneDNN).
The packing and the per-call preparation live in RepackedWeightOnlyKernel / RepackedLmHeadKernel,
shared with the AVX2 kernels (avx2.py), which read the same bytes. Where neither runs, the
pure-torch kernels in torch_cpu/ serve, with the reason shown by `anyquant inspect`.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from anyquant.errors import TensorError
from anyquant.quant.kernels import cpu_ext
from anyquant.quant.kernels.base import LinearKernel, check_weight, round_up
from anyquant.quant.kernels.torch_cpu import _act_order_permutation
from anyquant.quant.reference import fake_quantize_activations
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups
from anyquant.quant.weight_types import WEIGHT_TYPES

_INT4, _INT8, _FP8 = 0, 1, 2  # the extension's weight layouts
# Each weight type's layout, from the weight-type table (quant/weight_types.py): a new type with
# one of these layouts runs here with no change to this file.
_FORMAT = {
    name: {"int4": _INT4, "int8": _INT8, "fp8": _FP8}[traits.cpu_layout]
    for name, traits in WEIGHT_TYPES.items()
}
_ROWS = 16  # output rows per block: one 512-bit register of fp32 outputs
_DTYPES = (torch.bfloat16, torch.float32)
# bfloat16: up to this many rows the vector kernel (each weight decoded once in registers for
# every row), beyond it the GEMM, which at 512 rows reaches 0.98-1.05x oneDNN's bf16 GEMM of the
# same shape on a Zen 4 core (no AMX; the vector kernel's 8-row core 0.86-1.01x), at 64 rows is
# level with the vector kernel and at 5 faster (benchmarks/RESULTS.md).
_BF16_GEMV_MAX_ROWS = 4
# float32 x costs the vector kernel three bf16 passes; beyond this many rows at::mm's fp32 GEMM
# on dequantized tiles is faster (benchmarks/linear_kernels.py).
_FP32_GEMV_MAX_ROWS = 2
# Blocks of 16 rows dequantized per tile: 16 * 16 rows x 4864 inputs of bf16 is 2.5 MB at most
# for the shapes measured; with K = 896 a tile is 460 KB and stays in L2 for at::mm.
_TILE_BLOCKS = 16


@functools.cache
def _cpu_reason() -> str | None:
    """Why this CPU cannot run the kernels' instructions, or None."""
    if not torch.cpu._is_avx512_supported():
        return "CPU lacks AVX-512 (F/BW/VL/DQ)"
    if not torch.cpu._is_avx512_bf16_supported():
        return "CPU lacks avx512_bf16 (vdpbf16ps)"
    return None


@functools.cache
def _lut(weight: str) -> Tensor:
    """128 bf16 words (as int16) the extension looks codes up in: int4 code -> code - 8; fp8 magnitude
    bits -> value (the sign bit is added in the kernel). int8 needs no table (zeros)."""
    table = torch.zeros(128, dtype=torch.bfloat16)
    if _FORMAT[weight] == _INT4:
        table[:16] = torch.arange(16) - 8
    elif _FORMAT[weight] == _FP8:
        dtype = torch.float8_e4m3fn if weight == "fp8_e4m3" else torch.float8_e5m2
        table = torch.arange(128, dtype=torch.uint8).view(dtype).to(torch.bfloat16)  # exact
    return table.view(torch.int16).contiguous()


def _table_offset(spec: QuantSpec) -> int:
    """What the decoded value v is relative to the code: v = code - offset."""
    if spec.weight == "uint8":
        return 128  # stored as is: the 8-bit decoders yield the byte - 128
    return 8 if _FORMAT[spec.weight] == _INT4 else 0


class RepackedWeightOnlyKernel(LinearKernel):
    """What the weight-only kernels over the extension's repacked layout share, whatever the
    instruction set: the checks, the packing at load, the activations' preparation per call. A
    subclass names the CPU it needs (`cpu_reason`) and the extension's ops it calls
    (`_codes_times_scales`, `_dequantize_op`): cpu_avx512 below, cpu_avx2 in avx2.py."""

    packed: Tensor
    scale: Tensor
    zz: Tensor | None
    lut: Tensor
    perm: Tensor | None
    input_scale: Tensor | None
    input_zero: Tensor | None
    offset_t: Tensor | None

    device_types = ("cpu",)
    compute_dtypes = _DTYPES
    streamed_buffers = ("packed", "scale", "zz")

    @classmethod
    def cpu_reason(cls) -> str | None:
        """Why this CPU cannot run the subclass's instructions, or None."""
        raise NotImplementedError

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        if spec.weight not in _FORMAT:
            return f"weights are {spec.weight}; this kernel runs uint2/3/4, int8, uint8 and fp8"
        if spec.act is not None and not spec.is_float:
            return f"activations are quantized ({spec.act.describe()}); integer weights run weight-only here"
        if spec.has_offset and spec.group_size % 8:
            return f"float offsets per group of {spec.group_size} inputs; the per-group sums need a multiple of 8"
        if spec.granularity == "block" and spec.block_shape[1] % 8:
            return f"block scales {spec.block_shape} span a multiple of 8 inputs here"
        return cls.cpu_reason() or cpu_ext.unavailable_reason()

    def load(self, weight: QuantWeight | Tensor) -> None:
        weight = check_weight(weight, self)
        spec = weight.spec
        n, k = self.shape
        self.spec = spec
        self.dynamic_act = spec.act if spec.act is not None and spec.act.dynamic else None
        self.fmt = _FORMAT[spec.weight]
        if spec.granularity == "group":
            self.group = spec.group_size
        elif spec.granularity == "block":
            self.group = spec.block_shape[1]
        else:  # channel / tensor: one group spanning the (padded) row
            self.group = round_up(k, 8)
        ng = num_groups(k, self.group)
        self.k_pad, self.n_pad = ng * self.group, round_up(n, _ROWS)

        codes = weight.data
        perm = None
        if spec.act_order:
            perm = _act_order_permutation(weight.group_index, self.group, k)
            codes = codes[:, perm]
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("packed", self._pack(codes), persistent=False)
        scale, zz = self._per_group(weight, ng)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zz", zz, persistent=False)
        self.register_buffer("lut", _lut(spec.weight).clone(), persistent=False)
        self.register_buffer("input_scale", weight.input_scale, persistent=False)
        self.register_buffer("input_zero", weight.input_zero, persistent=False)
        # GGUF minimums (value = code * scale + offset): the extension multiplies code * scale;
        # the offsets add sum over the group's inputs of x times the group's offset, one small
        # [T, groups] x [groups, N] product per call (1/group of the main product's work).
        offset_t = (
            weight.offset.float().reshape(n, ng).t().contiguous() if weight.offset is not None else None
        )
        self.register_buffer("offset_t", offset_t, persistent=False)
        cpu_ext.ops()  # raises with the reason if the library cannot be loaded

    def _pack(self, codes: Tensor) -> Tensor:
        """[N, K] codes -> the extension's bytes [N/16, K/8, 64] (int4), [N/16, K/4, 64] (int8 /
        uint8) or [N/16, K/2, 32] (fp8)."""
        n, k = self.shape
        raw = codes.view(torch.uint8) if codes.dtype != torch.uint8 else codes
        if self.spec.weight == "int8":
            raw = raw ^ 0x80  # u = code + 128: the 8-bit decoders yield u - 128
        padded = torch.zeros(self.n_pad, self.k_pad, dtype=torch.uint8)
        padded[:n, :k] = raw  # padded inputs meet zero activations; padded rows are cut off
        nb = self.n_pad // _ROWS
        if self.fmt == _INT4:
            # [nb, k/8, row i, t, j]: code of (row i, input k + 2j + t); word 2i+t holds j = 0..3
            # in its nibbles, i.e. its low byte j = 0 | 1 << 4, its high byte j = 2 | 3 << 4.
            c = padded.view(nb, _ROWS, self.k_pad // 8, 4, 2).permute(0, 2, 1, 4, 3)
            words = c[..., 0::2] | (c[..., 1::2] << 4)  # [nb, k/8, 16, 2, 2 bytes]
            return words.reshape(nb, self.k_pad // 8, 64).contiguous()
        if self.fmt == _INT8:
            # [nb, k/4, row i, t, byte h]: byte h of word 2i+t is (row i, input k + 2h + t).
            c = padded.view(nb, _ROWS, self.k_pad // 4, 2, 2).permute(0, 2, 1, 4, 3)
            return c.reshape(nb, self.k_pad // 4, 64).contiguous()
        c = padded.view(nb, _ROWS, self.k_pad // 2, 2).permute(0, 2, 1, 3)  # byte 2i+t: (row i, k+t)
        return c.reshape(nb, self.k_pad // 2, 32).contiguous()

    def _per_group(self, weight: QuantWeight, ng: int) -> tuple[Tensor, Tensor | None]:
        """Scales and zero points (minus the table offset) as fp32 [N/16, ng, 16]."""
        spec, n = weight.spec, self.shape[0]
        if spec.granularity == "group":
            scale = weight.scale.float().reshape(n, ng)
        elif spec.granularity == "block":  # every row of a block of rows shares its block's scales
            scale = weight.scale.float().repeat_interleave(spec.block_shape[0], dim=0)[:n]
        else:  # tensor or channel: one group per row
            scale = weight.scale.float().reshape(-1, 1).expand(n, ng)
        zz = None
        offset = _table_offset(spec)
        if weight.zero is not None:
            zz = weight.zero.float().reshape(n, -1).expand(n, ng) - offset
        elif not spec.is_float and spec.implicit_zero != offset:  # uint2 / uint3
            zz = torch.full((n, ng), float(spec.implicit_zero - offset))

        def blocked(t: Tensor) -> Tensor:
            full = torch.zeros(self.n_pad, ng)
            full[:n] = t.expand(n, ng)
            return full.view(-1, _ROWS, ng).transpose(1, 2).contiguous()

        return blocked(scale), (blocked(zz) if zz is not None else None)

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n, k = self.shape
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        if self.spec.act is not None:  # fp8 activations: the reference's own fake quantization
            x = fake_quantize_activations(x, self.spec.act, self.input_scale, self.input_zero, act_amax)
        x = x.to(self.compute_dtype)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.k_pad != k:
            x = torch.nn.functional.pad(x, (0, self.k_pad - k))
        if self.offset_t is not None:
            y = self._codes_times_scales(x, None).float()
            xsum = x.float().view(x.shape[0], -1, self.group).sum(-1)
            y = torch.addmm(y, xsum, self.offset_t)
            return (y if bias is None else y + bias.float()).to(self.compute_dtype)
        return self._codes_times_scales(x, bias)

    def _codes_times_scales(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The prepared x (compute dtype, permuted, padded) times the codes and scales, plus bias."""
        raise NotImplementedError

    def _dequantize_op(self, dtype: torch.dtype) -> Tensor:
        """The whole layer from the extension: [N, k_pad] in `dtype`."""
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense [N, K] weight the tile path multiplies (columns in act-order's permuted order)."""
        k = self.shape[1]
        dense = self._dequantize_op(dtype)
        if self.offset_t is not None:
            offsets = self.offset_t.t().repeat_interleave(self.group, dim=1)
            dense = (dense.float() + offsets).to(dtype)
        return dense[:, :k]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={getattr(self, 'group', 0)}"


@register_kernel
class Avx512WeightOnlyKernel(RepackedWeightOnlyKernel):
    """uint2/3/4, int8/uint8 and fp8 weights (fp8 also with fp8 activations) on AVX512_BF16 CPUs.

    Numerics: the vector path sums bf16-exact weight values (code - offset) times the activations
    (bf16, or fp32 as three exact bf16 parts) in fp32 per group and applies scale and zero point
    once per group: no weight is rounded to bf16, so for bf16 compute it is closer to the float64
    result than the reference itself (which rounds every weight to bf16). The tile path forms the
    reference's own rounded weights. fp8 activation quantization is the reference's own function.
    """

    name = "cpu_avx512"
    priority = 60  # above cpu_avx2 (55) and the pure-torch CPU kernels (50)

    @classmethod
    def cpu_reason(cls) -> str | None:
        return _cpu_reason()

    def _codes_times_scales(self, x: Tensor, bias: Tensor | None) -> Tensor:
        n = self.shape[0]
        path = self.path(x.shape[0])
        if path == "gemv":
            return cpu_ext.ops().gemv(
                x, self.packed, self.scale, self.zz, self.lut, bias, self.fmt, self.group, n
            )
        if path == "gemm":
            return cpu_ext.ops().gemm(
                x, self.packed, self.scale, self.zz, self.lut, bias, self.fmt, self.group, n
            )
        return cpu_ext.ops().tiled_mm(
            x, self.packed, self.scale, self.zz, self.lut, bias, self.fmt, self.group, n, _TILE_BLOCKS
        )

    def path(self, rows: int) -> str:
        """Which of the extension's paths `rows` rows of x take: "gemv", "gemm" or "tiled"."""
        if self.compute_dtype == torch.bfloat16:
            return "gemv" if rows <= _BF16_GEMV_MAX_ROWS else "gemm"
        return "gemv" if rows <= _FP32_GEMV_MAX_ROWS else "tiled"

    def _dequantize_op(self, dtype: torch.dtype) -> Tensor:
        return cpu_ext.ops().dequantize(
            self.packed, self.scale, self.zz, self.lut, self.fmt, self.group, self.shape[0], dtype
        )


_DECODED = 3  # the extension's format for weights already held as bf16 words


class RepackedLmHeadKernel(LinearKernel):
    """An unquantized bfloat16 LM head through the same vector kernel, weights stored as bf16 words.

    The LM head is the largest matrix a small model reads per token (151936 x 896 bf16 = 272 MB
    for Qwen2.5-0.5B, more than half the bytes of a W4A16 decode step), and torch's bf16
    matrix-vector product streamed it at a fraction of the bandwidth the vector kernel reaches.
    Numerics: bf16 weights times bf16 inputs summed in fp32, one rounding of the output, like
    F.linear. A tied embedding table looks its tokens up in the same words (`rows`), so the
    table is held once.
    """

    streamed_buffers = ("packed",)
    packed: Tensor
    scale: Tensor
    lut: Tensor

    # Its own checks rather than the shared pre-check's: a dense kernel for one role, whose
    # refusals read better named for that role.
    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        if device.type != "cpu":
            return f"runs on CPU only, the layer is on {device.type}"
        if spec is not None:
            return f"layer is quantized ({cls.quantized_kernel} runs quantized layers)"
        if kind != "lm_head":
            return f"only the unquantized LM head runs here, not {kind} layers"
        if compute_dtype != torch.bfloat16:
            return f"compute dtype {compute_dtype}: only bfloat16 weights are kept as words"
        if min(shape) <= 0:
            return f"layer shape {list(shape)} has no weights"
        return cls.cpu_reason() or cpu_ext.unavailable_reason()

    # The quantized-layer kernel of the same instruction set, named in the refusal above.
    quantized_kernel: ClassVar[str] = ""

    @classmethod
    def cpu_reason(cls) -> str | None:
        """Why this CPU cannot run the subclass's instructions, or None."""
        raise NotImplementedError

    def load(self, weight: QuantWeight | Tensor) -> None:
        if isinstance(weight, QuantWeight):
            raise TypeError(f"{self.name} expects a plain tensor")
        n, k = self.shape
        if tuple(weight.shape) != (n, k):
            raise TensorError("weight", f"has shape {list(weight.shape)}, expected {[n, k]}")
        self.k_pad, n_pad = round_up(k, 8), round_up(n, _ROWS)
        if (n_pad, self.k_pad) == (n, k) and weight.dtype == torch.bfloat16:
            words = weight.contiguous()  # no padded copy: the LM head is the largest tensor loaded
        else:
            words = torch.zeros(n_pad, self.k_pad, dtype=torch.bfloat16)
            words[:n, :k] = weight
        nb = n_pad // _ROWS
        pairs = words.view(torch.int16).view(nb, _ROWS, self.k_pad // 2, 2).permute(0, 2, 1, 3)
        self.register_buffer("packed", pairs.contiguous().view(torch.uint8).reshape(-1), persistent=False)
        self.register_buffer("scale", torch.ones(nb, 1, _ROWS), persistent=False)
        self.register_buffer("lut", torch.zeros(128, dtype=torch.int16), persistent=False)
        cpu_ext.ops()  # raises with the reason if the library cannot be loaded

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` [T] of the weight as bf16 [T, K], read from the packed words: row r is
        position r % 16 of every pair of block r // 16, 64 bytes apart, so one row reads its
        block's consecutive cache lines."""
        k = self.shape[1]
        pairs = self.packed.view(torch.int16).view(-1, self.k_pad // 2, _ROWS, 2)
        picked = pairs[ids // _ROWS, :, ids % _ROWS, :]  # [T, k_pad / 2, 2]
        return picked.reshape(ids.shape[0], self.k_pad).view(torch.bfloat16)[:, :k]

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        n, k = self.shape
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        x = x.to(torch.bfloat16)
        if self.k_pad != k:
            x = torch.nn.functional.pad(x, (0, self.k_pad - k))
        return self._product(x, bias)

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The padded bf16 x times the words, plus bias."""
        raise NotImplementedError


@register_kernel
class Avx512DenseLmHeadKernel(RepackedLmHeadKernel):
    """The bf16 LM head on AVX512_BF16 CPUs: vdpbf16ps over the words (gemv.h), the GEMM for many rows."""

    name = "cpu_avx512_lm_head"
    priority = 110  # above cpu_avx2_lm_head (105) and the dense kernel (100)
    quantized_kernel = "cpu_avx512"

    @classmethod
    def cpu_reason(cls) -> str | None:
        return _cpu_reason()

    def path(self, rows: int) -> str:
        """Which of the extension's paths `rows` rows of x take: "gemv" or "gemm" (the captured
        step groups its batch buckets by these, engine/capture.py)."""
        return "gemv" if rows <= _BF16_GEMV_MAX_ROWS else "gemm"

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        n = self.shape[0]
        op = cpu_ext.ops().gemv if self.path(x.shape[0]) == "gemv" else cpu_ext.ops().gemm
        return op(x, self.packed, self.scale, None, self.lut, bias, _DECODED, self.k_pad, n)
