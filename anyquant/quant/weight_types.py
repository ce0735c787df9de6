"""Per-weight-type traits: one row per canonical code type, read by everything else in `quant/`.

Like ggml's type traits: what the rest of the package needs to know about a weight type (its
bits, signedness, code dtype and range, how checkpoints store its unpacked codes, which byte
patterns are not finite, which scale layouts it carries, how CPU kernels hold it) is declared
here once. A new weight type is a new row here plus its codec (the format that decodes and
encodes it); specs, weights, the reference, RTN and the kernels read the row.

GGUF's block types (Q4_0, Q4_K, ...) are storage layouts, each translated exactly into one of
these canonical types: their own table is `formats/gguf_blocks.py` (`BLOCK_TYPES`, with the
canonical spec of every block type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from anyquant.errors import UnsupportedError

# The canonical weight types: one row of WEIGHT_TYPES each (activation types are a subset).
WeightType = Literal["uint2", "uint3", "uint4", "uint8", "int8", "fp8_e4m3", "fp8_e5m2"]
# uint: unsigned codes, dequantized as (code - zero) * scale with a stored or implicit zero;
# int: two's complement codes, zero 0 unless stored; float: fp8 values, multiplied by the scale.
CodeFamily = Literal["uint", "int", "float"]
# How the CPU kernels hold the codes once repacked: uint2/3/4 widened to 4-bit fields, 8-bit
# integer bytes, or fp8 bytes. A kernel accepts a type by its layout, not by its name.
CpuLayout = Literal["int4", "int8", "fp8"]

_ALL_GRANULARITIES = frozenset(("tensor", "channel", "group", "block"))


@dataclass(frozen=True)
class WeightTypeTraits:
    name: WeightType
    family: CodeFamily
    bits: int  # bits per code when bit-packed (what a packing kernel or format keeps per weight)
    code_dtype: torch.dtype  # `QuantWeight.data`: one code per element, never bit-packed
    code_min: float  # smallest code (uint/int) or most negative finite value (fp8)
    code_max: float  # largest code (uint/int) or largest finite value (fp8)
    # The safetensors dtype a checkpoint stores unpacked codes in (lmdeploy's I8 / F8_E4M3
    # weights, compressed-tensors' int- and float-quantized); None: stored bit-packed only.
    stored_dtype: str | None
    # fp8 only: a code byte b is NaN or Inf exactly when (b & mask) == mask (the exponent, and for
    # e4m3fn, which has no Inf, the mantissa too, all ones). None: every code is finite.
    nonfinite_mask: int | None
    granularities: frozenset[str]  # scale layouts this type may carry
    cpu_layout: CpuLayout

    @property
    def is_uint(self) -> bool:
        return self.family == "uint"

    @property
    def is_float(self) -> bool:
        return self.family == "float"

    @property
    def implicit_zero(self) -> int:
        """The zero point when none is stored (and no float offset is): the middle code of an
        unsigned type, 0 for signed and float types."""
        return 1 << (self.bits - 1) if self.is_uint else 0

    @property
    def symmetric_max(self) -> float:
        """The code magnitude a symmetric scale maps a weight's absolute maximum to: 127 for
        int8, the largest finite value for fp8, half the code range for unsigned types."""
        if self.is_uint:
            return (self.code_max - self.code_min) / 2
        return self.code_max


def _uint(name: WeightType, bits: int) -> WeightTypeTraits:
    return WeightTypeTraits(
        name=name,
        family="uint",
        bits=bits,
        code_dtype=torch.uint8,
        code_min=0,
        code_max=(1 << bits) - 1,
        stored_dtype=None,
        nonfinite_mask=None,
        # Integer codes need a scale per output row at least: zero points and packing are per row.
        granularities=frozenset(("channel", "group")),
        cpu_layout="int4" if bits <= 4 else "int8",
    )


def _fp8(name: WeightType, dtype: torch.dtype, largest: float, stored: str, mask: int) -> WeightTypeTraits:
    return WeightTypeTraits(
        name=name,
        family="float",
        bits=8,
        code_dtype=dtype,
        code_min=-largest,
        code_max=largest,
        stored_dtype=stored,
        nonfinite_mask=mask,
        granularities=_ALL_GRANULARITIES,
        cpu_layout="fp8",
    )


WEIGHT_TYPES: dict[str, WeightTypeTraits] = {
    t.name: t
    for t in (
        _uint("uint2", 2),
        _uint("uint3", 3),
        _uint("uint4", 4),
        _uint("uint8", 8),
        WeightTypeTraits(
            name="int8",
            family="int",
            bits=8,
            code_dtype=torch.int8,
            code_min=-128,
            code_max=127,
            stored_dtype="I8",
            nonfinite_mask=None,
            granularities=_ALL_GRANULARITIES,
            cpu_layout="int8",
        ),
        # e4m3fn: no infinities, NaN is S.1111.111; e5m2: IEEE-like, exponent 11111 is Inf or NaN.
        _fp8("fp8_e4m3", torch.float8_e4m3fn, 448.0, "F8_E4M3", 0x7F),
        _fp8("fp8_e5m2", torch.float8_e5m2, 57344.0, "F8_E5M2", 0x7C),
    )
}


def weight_traits(name: str) -> WeightTypeTraits:
    """The traits of weight (or activation) type `name`; ValueError naming the known ones."""
    found = WEIGHT_TYPES.get(name)
    if found is None:
        raise ValueError(f"unknown weight type {name!r}; known: {', '.join(WEIGHT_TYPES)}")
    return found


def traits_of_dtype(dtype: torch.dtype) -> WeightTypeTraits | None:
    """The fp8 type whose codes are stored as `dtype` (the integer dtypes hold several types)."""
    return next((t for t in WEIGHT_TYPES.values() if t.is_float and t.code_dtype == dtype), None)


def canonical_uint(bits: int) -> WeightType:
    """The narrowest unsigned type holding `bits`-bit codes (5- to 7-bit codes go to uint8)."""
    fits = [t for t in WEIGHT_TYPES.values() if t.is_uint and t.bits >= bits]
    if not fits:
        raise UnsupportedError(f"{bits}-bit codes do not fit the canonical layout")
    return min(fits, key=lambda t: t.bits).name
