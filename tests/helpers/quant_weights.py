"""Random canonical weights (`QuantWeight`) for any quantization spec, for kernel, format,
sharding and merging tests: one generator, so every test draws its weights the same way."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from anyquant.quant.reference import dequantize, fake_quantize_activations
from anyquant.quant.spec import FP8_MAX, QuantSpec
from anyquant.quant.weight import QuantWeight

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def random_weight(spec: QuantSpec, n: int, k: int, seed: int = 0, *, f16_exact: bool = False) -> QuantWeight:
    """Random codes, scales ~0.01, zero points, act-order index, GGUF-style float offsets and static
    input scales for `spec` (deterministic in `seed`). `f16_exact`: scales are small integers times 2^-14, exactly
    representable in float16, for formats that store them so (round trips compare exactly)."""
    gen = torch.Generator().manual_seed(seed)
    if spec.granularity == "group":
        scale_shape: tuple[int, ...] = (n, -(-k // spec.group_size))
    elif spec.granularity == "block":
        scale_shape = (-(-n // spec.block_shape[0]), -(-k // spec.block_shape[1]))
    elif spec.granularity == "channel":
        scale_shape = (n,)
    else:
        scale_shape = ()
    if f16_exact:
        scale = torch.randint(1, 2048, scale_shape, generator=gen).float() * 2.0**-14
    else:
        scale = 0.005 + 0.01 * torch.rand(scale_shape, generator=gen)
    zero = group_index = input_scale = input_zero = None
    if spec.is_uint:
        top = 1 << spec.bits
        data = torch.randint(0, top, (n, k), generator=gen, dtype=torch.uint8)
        if spec.has_zero:
            zero = torch.randint(0, top, scale_shape, generator=gen, dtype=torch.int32)
        if spec.act_order:
            columns = torch.arange(k) // spec.group_size
            group_index = columns[torch.randperm(k, generator=gen)].to(torch.int32)
    elif spec.weight == "int8":
        data = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        top = FP8_MAX[spec.weight]
        data = (torch.randn(n, k, generator=gen) * top / 4).clamp(-top, top).to(_FP8[spec.weight])
        scale = scale * 100 / top
    act = spec.act
    if act is not None and not act.dynamic:
        # Static scale: |x| of a few units spans most of the code range without much clipping.
        qmax = 127.0 if act.type == "int8" else FP8_MAX[act.type]
        input_scale = torch.tensor([3.0 / qmax])
        if not act.symmetric:
            input_zero = torch.tensor([-7], dtype=torch.int32)
    weight = QuantWeight(spec, (n, k), data, scale.float(), zero, group_index, input_scale, input_zero)
    if spec.has_offset:  # GGUF-style minimums: value = code * scale + offset, offsets below zero
        spread = 0.5 + torch.rand(scale_shape, generator=torch.Generator().manual_seed(seed))
        weight = dataclasses.replace(weight, offset=(-8 * weight.scale * spread).float())
    return weight.validate("random")


def float64_linear(
    x: Tensor, w: QuantWeight, bias: Tensor | None = None, amax: Tensor | None = None
) -> Tensor:
    """The float64 truth of a quantized linear layer by the reference's definition: x (fake-quantized
    by the reference where the spec quantizes activations; `amax` a given dynamic amax) times the
    float64 dequantized weight, plus bias."""
    if w.spec.act is not None:
        x = fake_quantize_activations(x, w.spec.act, w.input_scale, w.input_zero, amax)
    y = x.double() @ dequantize(w, torch.float64).T
    return y + bias.double() if bias is not None else y


def avx512_gemm_folds(spec: QuantSpec, rows: int) -> bool:
    """Whether cpu_avx512's GEMM folds the scales into bf16 weights for bf16 x (csrc/gemm_tile.h,
    gemm_folds): groups of at most 64 over at least 64 rows. Its weights are then the reference
    kernel's, bf16((v - zz) * scale), instead of the exact values."""
    return spec.granularity == "group" and (spec.group_size or 0) <= 64 and rows >= 64
