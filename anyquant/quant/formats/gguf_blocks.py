"""GGML block layouts -> canonical codes, scales and offsets, one function per tensor type.

Owns the bit layout of every GGML quantized block anyquant reads (ggml-common.h's block_q4_0 ...
block_iq4_xs) and its exact translation: for every element, code, scale and offset are chosen so
that the reference dequantization ((code - zero) * scale [+ offset], in fp32) gives the bits of
GGML's own dequantization (the same fp32 products and sums, in the same order). Per type:

| type    | block | canonical                 | scale (fp32)           | offset (fp32)        |
|---------|-------|---------------------------|------------------------|----------------------|
| Q4_0    | 32    | uint4 group32 sym (8)     | d                      |                      |
| Q4_1    | 32    | uint4 group32 offset      | d                      | m                    |
| Q5_0    | 32    | int8 group32 (q - 16)     | d                      |                      |
| Q5_1    | 32    | uint8 group32 offset      | d                      | m                    |
| Q8_0    | 32    | int8 group32              | d                      |                      |
| Q2_K    | 256   | uint2 group16 offset      | d * (sc & 15)          | -(dmin * (sc >> 4))  |
| Q3_K    | 256   | uint3 group16 sym (4)     | d * (sc6 - 32)         |                      |
| Q4_K    | 256   | uint4 group32 offset      | d * sc6                | -(dmin * m6)         |
| Q5_K    | 256   | uint8 group32 offset      | d * sc6                | -(dmin * m6)         |
| Q6_K    | 256   | int8 group16 (q - 32)     | d * sc8                |                      |
| Q8_K    | 256   | int8 group256             | d (fp32)               |                      |
| IQ4_NL  | 32    | int8 group32 (table[q])   | d                      |                      |
| IQ4_XS  | 256   | int8 group32 (table[q])   | d * (sc6 - 32)         |                      |

5- and 6-bit codes are held as 8-bit codes (signed where GGML subtracts a constant): the same
values, served by the int8 kernels, at 8 bits per weight in memory instead of 5.5 / 6.6. The
non-uniform IQ4 table values (-127..113) are int8 codes for the same reason.
Every function takes the raw bytes [rows, bytes per row] and returns (codes, scale, offset) with
codes [rows, K] and scale / offset [rows, K / group].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from anyquant.quant.spec import QuantSpec

QK_K = 256  # elements per k-quant super-block
# IQ4_NL / IQ4_XS non-uniform 4-bit levels (ggml-common.h kvalues_iq4nl).
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

Decoded = tuple[Tensor, Tensor, Tensor | None]


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int  # elements per block
    nbytes: int  # bytes per block
    spec: QuantSpec
    decode: Callable[[Tensor], Decoded]  # [blocks, nbytes] uint8 -> codes [blocks, block], ...


def _f16(raw: Tensor) -> Tensor:
    """[blocks, 2] little-endian bytes -> fp32 [blocks, 1] (fp16 -> fp32 is exact)."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles_split(qs: Tensor) -> Tensor:
    """[blocks, 16] bytes -> [blocks, 32]: the low nibbles are elements 0..15, the high 16..31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits_of(raw: Tensor, nbits: int) -> Tensor:
    """[blocks, n] bytes -> [blocks, nbits, n]: entry [b, i, l] is bit i of byte l."""
    shifts = torch.arange(nbits, dtype=torch.uint8).view(1, nbits, 1)
    return (raw.unsqueeze(1) >> shifts) & 1


def _crumbs(raw: Tensor) -> Tensor:
    """[blocks, 32 * h] bytes -> [blocks, 128 * h]: per half of 32 bytes, the 2-bit fields at shifts
    0, 2, 4, 6 are 4 runs of 32 elements (Q2_K / Q3_K low bits, Q6_K high bits)."""
    halves = raw.view(raw.shape[0], -1, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    return ((halves >> shifts) & 3).reshape(raw.shape[0], -1)


def _nibble_runs(raw: Tensor, run: int) -> Tensor:
    """[blocks, n] bytes -> [blocks, 2n]: per chunk of `run` bytes, the low nibbles then the high
    nibbles (Q4_K / Q5_K low bits with run 32, Q6_K low bits with run 64, IQ4_XS with run 16)."""
    chunks = raw.view(raw.shape[0], -1, 1, run)
    shifts = torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    return ((chunks >> shifts) & 0x0F).reshape(raw.shape[0], -1)


def _k_scale_min(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K 12 bytes -> eight 6-bit scales and eight 6-bit minimums (as fp32)."""
    lo, mid, top = raw[:, 0:4], raw[:, 4:8], raw[:, 8:12]
    sc = torch.cat((lo & 63, (top & 0x0F) | ((lo >> 2) & 0x30)), dim=-1)
    mn = torch.cat((mid & 63, (top >> 4) | ((mid >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


def _q4_0(b: Tensor) -> Decoded:
    return _nibbles_split(b[:, 2:18]), _f16(b[:, 0:2]), None


def _q4_1(b: Tensor) -> Decoded:
    return _nibbles_split(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_high(qh: Tensor) -> Tensor:
    """Q5_0 / Q5_1: 4 bytes = a little-endian 32-bit mask, bit j the 5th bit of element j."""
    return _bits_of(qh, 8).transpose(1, 2).reshape(qh.shape[0], 32)


def _q5_0(b: Tensor) -> Decoded:
    q = _nibbles_split(b[:, 6:22]) | (_q5_high(b[:, 2:6]) << 4)
    return (q.to(torch.int16) - 16).to(torch.int8), _f16(b[:, 0:2]), None


def _q5_1(b: Tensor) -> Decoded:
    q = _nibbles_split(b[:, 8:24]) | (_q5_high(b[:, 4:8]) << 4)
    return q, _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b: Tensor) -> Decoded:
    return b[:, 2:34].contiguous().view(torch.int8), _f16(b[:, 0:2]), None


def _q2_k(b: Tensor) -> Decoded:
    sc, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    scale = d * (sc & 0x0F).float()
    offset = -(dmin * (sc >> 4).float())
    return _crumbs(qs), scale, offset


def _q3_k(b: Tensor) -> Decoded:
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    j = torch.arange(16)
    low4 = (packed[:, j % 8] >> (4 * (j // 8)).to(torch.uint8)) & 0x0F
    high2 = (packed[:, 8 + j % 4] >> (2 * (j // 4)).to(torch.uint8)) & 3
    scale = d * ((low4 | (high2 << 4)).to(torch.int16) - 32).float()
    high = _bits_of(hmask, 8).reshape(b.shape[0], QK_K)  # bit i of byte l -> element 32 i + l
    # GGML subtracts 4 where the high bit is clear: q = low - 4 (1 - h), i.e. code (low + 4 h) - 4.
    return _crumbs(qs) | (high << 2), scale, None


def _q4_k(b: Tensor) -> Decoded:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return _nibble_runs(b[:, 16:144], 32), d * sc, -(dmin * mn)


def _q5_k(b: Tensor) -> Decoded:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    high = _bits_of(b[:, 16:48], 8).reshape(b.shape[0], QK_K)
    return _nibble_runs(b[:, 48:176], 32) | (high << 4), d * sc, -(dmin * mn)


def _q6_k(b: Tensor) -> Decoded:
    ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    q = _nibble_runs(ql, 64) | (_crumbs(qh) << 4)
    return (q.to(torch.int16) - 32).to(torch.int8), d * sc.contiguous().view(torch.int8).float(), None


def _q8_k(b: Tensor) -> Decoded:
    d = b[:, 0:4].contiguous().view(torch.float32)
    return b[:, 4:260].contiguous().view(torch.int8), d, None


def _iq4_levels(q: Tensor) -> Tensor:
    return torch.tensor(IQ4_LEVELS, dtype=torch.int8)[q.long()]


def _iq4_nl(b: Tensor) -> Decoded:
    return _iq4_levels(_nibbles_split(b[:, 2:18])), _f16(b[:, 0:2]), None


def _iq4_xs(b: Tensor) -> Decoded:
    d = _f16(b[:, 0:2])
    high_bits = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    j = torch.arange(8)
    high = (high_bits >> (2 * j)) & 3
    low = (b[:, 4 + j // 2] >> (4 * (j % 2)).to(torch.uint8)) & 0x0F
    scale = d * ((low.to(torch.int32) | (high << 4)) - 32).float()
    return _iq4_levels(_nibble_runs(b[:, 8:136], 16)), scale, None


def _spec(weight: str, group: int, offset: bool = False) -> QuantSpec:
    return QuantSpec(weight, "group", group_size=group, has_offset=offset)  # type: ignore[arg-type]


BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q4_0", 32, 18, _spec("uint4", 32), _q4_0),
        BlockType("Q4_1", 32, 20, _spec("uint4", 32, offset=True), _q4_1),
        BlockType("Q5_0", 32, 22, _spec("int8", 32), _q5_0),
        BlockType("Q5_1", 32, 24, _spec("uint8", 32, offset=True), _q5_1),
        BlockType("Q8_0", 32, 34, _spec("int8", 32), _q8_0),
        BlockType("Q2_K", QK_K, 84, _spec("uint2", 16, offset=True), _q2_k),
        BlockType("Q3_K", QK_K, 110, _spec("uint3", 16), _q3_k),
        BlockType("Q4_K", QK_K, 144, _spec("uint4", 32, offset=True), _q4_k),
        BlockType("Q5_K", QK_K, 176, _spec("uint8", 32, offset=True), _q5_k),
        BlockType("Q6_K", QK_K, 210, _spec("int8", 16), _q6_k),
        BlockType("Q8_K", QK_K, 292, _spec("int8", QK_K), _q8_k),
        BlockType("IQ4_NL", 32, 18, _spec("int8", 32), _iq4_nl),
        BlockType("IQ4_XS", QK_K, 136, _spec("int8", 32), _iq4_xs),
    )
}
# Stored unquantized: read as plain tensors of these dtypes.
FLOAT_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def decode_rows(kind: BlockType, raw: Tensor) -> Decoded:
    """[rows, K / block * nbytes] uint8 -> codes [rows, K], scale and offset [rows, K / group]."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, kind.nbytes)
    codes, scale, offset = kind.decode(blocks)
    group = kind.spec.group_size
    codes = codes.reshape(rows, -1)
    per_row = codes.shape[1] // group
    scale = scale.reshape(rows, per_row).contiguous()
    offset = None if offset is None else offset.reshape(rows, per_row).contiguous()
    return codes.contiguous(), scale, offset
