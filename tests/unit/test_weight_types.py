"""The per-weight-type traits table against torch's own dtypes, and the one non-finite check.

The oracle is torch: `torch.iinfo` / `torch.finfo` for ranges, and every one of the 256 byte
patterns of each fp8 dtype converted to float32 and tested with `torch.isfinite`.
"""

from __future__ import annotations

import pytest
import torch

from anyquant.errors import NumericsError, UnsupportedError
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import require_finite, require_finite_codes
from anyquant.quant.weight_types import WEIGHT_TYPES, canonical_uint, traits_of_dtype, weight_traits

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _all_codes(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)


@pytest.mark.parametrize("name", sorted(FP8_DTYPES))
def test_fp8_nonfinite_bytes_are_exactly_torchs(name: str) -> None:
    dtype = FP8_DTYPES[name]
    codes = _all_codes(dtype)
    torch_nonfinite = ~torch.isfinite(codes.float())
    mask = weight_traits(name).nonfinite_mask
    assert mask is not None
    ours = (codes.view(torch.uint8) & mask) == mask
    assert torch.equal(ours, torch_nonfinite)
    # And the check raises on each such byte alone, never on a finite one.
    for byte in range(256):
        one = codes[byte : byte + 1]
        if bool(torch_nonfinite[byte]):
            with pytest.raises(NumericsError, match=r"'w': 1 of 1 fp8 weight codes are NaN or Inf"):
                require_finite_codes("w", one)
        else:
            require_finite_codes("w", one)


def test_e5m2_infinities_are_refused_and_e4m3_has_none() -> None:
    # e5m2 is IEEE-like: 0x7C / 0xFC are +-Inf, which a NaN-only mask (0x7F) would let through.
    inf = torch.tensor([0x7C, 0xFC], dtype=torch.uint8).view(torch.float8_e5m2)
    assert torch.isinf(inf.float()).all()
    with pytest.raises(NumericsError, match="2 of 2 fp8 weight codes"):
        require_finite_codes("w", inf)
    # e4m3fn has no Inf: 0x7E is its largest finite value (448), only 0x7F / 0xFF are NaN.
    top = torch.tensor([0x7E, 0xFE], dtype=torch.uint8).view(torch.float8_e4m3fn)
    require_finite_codes("w", top)
    assert top.float().abs().tolist() == [448.0, 448.0]


@pytest.mark.parametrize("name", sorted(FP8_DTYPES))
def test_fp8_range_and_dtype_are_torchs(name: str) -> None:
    traits = weight_traits(name)
    finfo = torch.finfo(FP8_DTYPES[name])
    assert traits.code_dtype == FP8_DTYPES[name]
    assert (traits.code_min, traits.code_max) == (finfo.min, finfo.max)
    assert traits_of_dtype(FP8_DTYPES[name]) is traits


def test_integer_ranges_fit_their_code_dtype() -> None:
    for traits in WEIGHT_TYPES.values():
        if traits.is_float:
            continue
        info = torch.iinfo(traits.code_dtype)
        assert info.min <= traits.code_min < traits.code_max <= info.max, traits.name
        assert traits.code_max - traits.code_min == (1 << traits.bits) - 1, traits.name
    assert traits_of_dtype(torch.int8) is None  # int8 codes hold several types; all finite
    require_finite_codes("w", torch.tensor([-128, 127], dtype=torch.int8))


def test_specs_read_the_table() -> None:
    for name, traits in WEIGHT_TYPES.items():
        gran = "group" if "group" in traits.granularities else "channel"
        spec = QuantSpec(name, gran, group_size=32 if gran == "group" else 0)  # type: ignore[arg-type]
        assert (spec.bits, spec.is_uint, spec.is_float) == (traits.bits, traits.is_uint, traits.is_float)
        assert spec.implicit_zero == traits.implicit_zero
    with pytest.raises(ValueError, match="uint4 weights need channel or group scales"):
        QuantSpec("uint4", "tensor")
    with pytest.raises(ValueError, match="unknown weight type 'int4'"):
        weight_traits("int4")


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        (torch.tensor([1.0, float("nan"), 2.0]), 1),
        (torch.tensor([float("inf"), -float("inf"), 0.5]), 2),
        (torch.tensor([[1.0, 2.0], [3.0, float("nan")]], dtype=torch.float16), 1),
    ],
)
def test_require_finite_counts_and_names(values: torch.Tensor, bad: int) -> None:
    with pytest.raises(NumericsError, match=rf"'x\.scales': {bad} of {values.numel()} scales are NaN or Inf"):
        require_finite("x.scales", values)
    require_finite("x.scales", torch.zeros(0))
    require_finite("x.scales", torch.tensor([1e30, -1e-30]))


def test_canonical_uint_is_the_narrowest_that_holds_the_codes() -> None:
    got = {bits: canonical_uint(bits) for bits in range(1, 9)}
    assert got == {
        1: "uint2",
        2: "uint2",
        3: "uint3",
        4: "uint4",
        5: "uint8",
        6: "uint8",
        7: "uint8",
        8: "uint8",
    }
    with pytest.raises(UnsupportedError, match="9-bit codes"):
        canonical_uint(9)
