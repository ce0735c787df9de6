"""Bit packing shared by the formats: LSB-first bitstreams and AWQ's nibble interleave.

Owns the two packing primitives of formats.md §0.2 on int32 words. Knows nothing about which
format uses which dimension; formats pass the dimension and the value count.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF

# AWQ-GEMM: field i of a word holds logical column 8*w + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# ... equivalently logical column n sits in field AWQ_POS[n % 8].
AWQ_POS = (0, 4, 1, 5, 2, 6, 3, 7)


def packed_len(count: int, bits: int, word_bits: int = 32) -> int:
    """Words needed for `count` values of `bits` bits in a dense bitstream."""
    return -(-count * bits // word_bits)


def _as_u32(words: Tensor) -> Tensor:
    # int32 words are bit patterns; widen to int64 so shifts are logical, never arithmetic.
    return words.to(torch.int64) & _MASK32


def _to_i32(values: Tensor) -> Tensor:
    values = values & _MASK32
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def unpack_bits(words: Tensor, bits: int, count: int, dim: int = -1) -> Tensor:
    """Read `count` unsigned `bits`-bit values from an LSB-first bitstream of int32 words along `dim`.

    Returns uint8 codes with `dim` replaced by `count`.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"unsupported bit width {bits}")
    w = _as_u32(words.movedim(dim, -1))
    lead, nwords = w.shape[:-1], w.shape[-1]
    if nwords < packed_len(count, bits):
        raise ValueError(f"{nwords} words hold fewer than {count} values of {bits} bits")
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        codes = ((w.unsqueeze(-1) >> shifts) & mask).reshape(*lead, nwords * per)
    else:
        # Values straddle word boundaries: read each through a 64-bit window of two words.
        pos = torch.arange(count, dtype=torch.int64) * bits
        first, offset = pos // 32, pos % 32
        padded = torch.cat([w, torch.zeros(*lead, 1, dtype=torch.int64)], dim=-1)
        window = padded[..., first] | (padded[..., first + 1] << 32)
        codes = (window >> offset) & mask
    return codes[..., :count].to(torch.uint8).movedim(-1, dim)


def pack_bits(codes: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Inverse of `unpack_bits`: pack unsigned codes along `dim` into int32 words (zero-filled tail)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unsupported bit width {bits}")
    c = codes.movedim(dim, -1).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    lead, count = c.shape[:-1], c.shape[-1]
    nwords = packed_len(count, bits)
    if 32 % bits == 0:
        per = 32 // bits
        c = torch.nn.functional.pad(c, (0, nwords * per - count)).reshape(*lead, nwords, per)
        shifts = torch.arange(per, dtype=torch.int64) * bits
        words = (c << shifts).sum(dim=-1)
    else:
        pos = torch.arange(count, dtype=torch.int64) * bits
        first, offset = pos // 32, pos % 32
        words = torch.zeros(*lead, nwords + 1, dtype=torch.int64)
        # Distinct values never share bits, so add == or; scatter_add handles repeated indices.
        words.scatter_add_(-1, first.expand(*lead, count), (c << offset) & _MASK32)
        words.scatter_add_(-1, (first + 1).expand(*lead, count), c >> (32 - offset))
        words = words[..., :nwords]
    return _to_i32(words).movedim(-1, dim)


def awq_unpack(words: Tensor, count: int) -> Tensor:
    """AWQ-GEMM interleaved nibbles packed along the last dim -> uint8 codes [..., count]."""
    seq = unpack_bits(words, 4, words.shape[-1] * 8)  # field order
    lead = seq.shape[:-1]
    logical = seq.reshape(*lead, -1, 8)[..., list(AWQ_POS)].reshape(*lead, -1)
    return logical[..., :count]


def awq_pack(codes: Tensor) -> Tensor:
    """Inverse of `awq_unpack`; the last dim must be a multiple of 8."""
    lead, count = codes.shape[:-1], codes.shape[-1]
    if count % 8:
        raise ValueError(f"AWQ packs 8 columns per word; {count} is not a multiple of 8")
    seq = codes.reshape(*lead, -1, 8)[..., list(AWQ_ORDER)].reshape(*lead, count)
    return pack_bits(seq, 4)
