"""`fit_exact`: a canonical weight rewritten under another spec keeps every dequantized value
(checked with a float64 formula written here from the raw tensors), or the reason it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from anyquant.convert.exact import fit_exact, minimal
from anyquant.quant.spec import ActQuant, QuantSpec
from anyquant.quant.weight import QuantWeight

N, K = 48, 128
G = torch.Generator().manual_seed(0)


def values(w: QuantWeight) -> Tensor:
    """(code - zero) * scale in float64, independently of anyquant's dequantize."""
    spec = w.spec
    codes = w.data.double() if spec.is_float else w.data.to(torch.int64).double()
    if spec.granularity == "group":
        per_col = torch.arange(K) // spec.group_size
        scale = w.scale.double()[:, per_col]
        zero = w.zero.double()[:, per_col] if w.zero is not None else float(spec.implicit_zero)
    elif spec.granularity == "channel":
        scale = w.scale.double()[:, None]
        zero = w.zero.double()[:, None] if w.zero is not None else float(spec.implicit_zero)
    else:
        scale, zero = w.scale.double(), float(spec.implicit_zero)
    return (codes - zero) * scale


def uint(
    bits: int, group: int, has_zero: bool, scale: Tensor, zero_range: tuple[int, int] | None = None
) -> QuantWeight:
    spec = QuantSpec(f"uint{bits}", "group" if group else "channel", group_size=group, has_zero=has_zero)  # type: ignore[arg-type]
    data = torch.randint(0, 1 << bits, (N, K), generator=G, dtype=torch.uint8)
    zero = None
    if has_zero:
        lo, hi = zero_range or (0, (1 << bits) - 1)
        zero = torch.randint(lo, hi + 1, tuple(scale.shape), generator=G, dtype=torch.int32)
    return QuantWeight(spec, (N, K), data, scale, zero).validate("w")


def f16_scales(*shape: int) -> Tensor:
    return (torch.rand(*shape, generator=G) * 0.02 + 1e-3).half().float()


def check_exact(w: QuantWeight, target: QuantSpec, dtype: torch.dtype = torch.float16) -> QuantWeight:
    out = fit_exact(w, target, dtype)
    assert isinstance(out, QuantWeight), out
    assert out.spec == target
    assert torch.equal(values(out), values(w))
    return out


def test_finer_source_groups_merge_when_their_scales_agree() -> None:
    scale = f16_scales(N, K // 64).repeat_interleave(2, dim=1)  # pairs of 32-groups share a scale
    w = uint(4, 32, True, scale)
    assert w.zero is not None
    w.zero = w.zero[:, ::2].repeat_interleave(2, dim=1)  # and a zero point
    out = check_exact(w, QuantSpec("uint4", "group", group_size=64, has_zero=True))
    assert out.scale.shape == (N, 2)
    w.scale[0, 0] *= 2
    reason = fit_exact(w, QuantSpec("uint4", "group", group_size=64, has_zero=True), torch.float16)
    assert isinstance(reason, str) and "scales differ within one group of 64 inputs" in reason


def test_channel_to_group_and_widths() -> None:
    w = uint(4, 0, True, f16_scales(N))
    check_exact(w, QuantSpec("uint4", "group", group_size=32, has_zero=True))
    check_exact(w, QuantSpec("uint8", "group", group_size=32))  # levels -15..15 fit around 128
    check_exact(w, QuantSpec("fp8_e4m3", "channel"), torch.float32)  # small integers are fp8 values
    reason = fit_exact(w, QuantSpec("uint4", "channel"), torch.float16)  # sym 4-bit: only -8..7
    assert isinstance(reason, str) and "implicit zero 8" in reason


def test_narrower_codes_only_when_the_levels_fit() -> None:
    scale = f16_scales(N, K // 32)
    data = torch.randint(120, 136, (N, K), generator=G, dtype=torch.uint8)  # levels -8..7
    w = QuantWeight(QuantSpec("uint8", "group", group_size=32), (N, K), data, scale).validate("w")
    check_exact(w, QuantSpec("uint4", "group", group_size=32))
    w.data[3, 5] = 200
    reason = fit_exact(w, QuantSpec("uint4", "group", group_size=32), torch.float16)
    assert isinstance(reason, str) and "outside" in reason
    # Asymmetric targets pick a zero point per group that makes every level fit, if it is a code.
    w.data[3, :32] = torch.arange(250, 282, dtype=torch.int32).div(2, rounding_mode="floor").to(torch.uint8)
    check_exact(w, QuantSpec("uint4", "group", group_size=32, has_zero=True))  # levels -3..12: zero 3
    w.data[3, :32] = 70 + torch.arange(32, dtype=torch.uint8) // 2  # levels -58..-43: zero 58 is no code
    reason = fit_exact(w, QuantSpec("uint4", "group", group_size=32, has_zero=True), torch.float16)
    assert isinstance(reason, str) and "zero point that is itself a code" in reason


def test_int8_to_uint8_and_minimal_zero_points() -> None:
    data = torch.randint(-128, 128, (N, K), generator=G, dtype=torch.int8)
    w = QuantWeight(QuantSpec("int8", "channel"), (N, K), data, f16_scales(N)).validate("w")
    check_exact(w, QuantSpec("uint8", "channel"))
    awq_style = uint(4, 32, True, f16_scales(N, K // 32), zero_range=(8, 8))
    assert minimal(awq_style).spec.has_zero is False and minimal(awq_style).zero is None


def test_refusals_name_the_reason() -> None:
    w = uint(4, 32, False, torch.rand(N, K // 32, generator=G) * 0.01 + 1e-3)  # not float16 values
    reason = fit_exact(w, QuantSpec("uint4", "group", group_size=32), torch.float16)
    assert isinstance(reason, str) and "not exactly representable in float16" in reason
    out = fit_exact(w, QuantSpec("uint4", "group", group_size=32), torch.float32)
    assert isinstance(out, QuantWeight)
    act = QuantSpec("uint4", "group", group_size=32, act=ActQuant("int8", dynamic=True))
    reason = fit_exact(w, act, torch.float32)
    assert isinstance(reason, str) and "activation quantization differs" in reason
    fp8 = QuantWeight(
        QuantSpec("fp8_e4m3", "channel"), (N, K), (torch.randn(N, K, generator=G)).to(torch.float8_e4m3fn),
        f16_scales(N),
    )  # fmt: skip
    reason = fit_exact(fp8, QuantSpec("uint8", "channel"), torch.float32)
    assert isinstance(reason, str) and "not integers" in reason


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asym_round_trip_restores_zero_points(bits: int) -> None:
    """Through a wider symmetric form and back, the preferred zero point is the source's own."""
    w = uint(bits, 32, True, f16_scales(N, K // 32))
    wide = check_exact(w, QuantSpec("uint8", "group", group_size=32, has_zero=True))
    back = check_exact(wide, w.spec)
    assert torch.equal(back.data, w.data) and torch.equal(back.zero, w.zero)  # type: ignore[arg-type]
