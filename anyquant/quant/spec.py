"""What a quantized layer's numbers are: `QuantSpec` and its vocabulary.

Owns the canonical description every format translates into and every kernel starts from.
It holds no tensors; `quant/weight.py` holds the numbers described here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from anyquant.quant.weight_types import WEIGHT_TYPES, WeightType, WeightTypeTraits, weight_traits

Granularity = Literal["tensor", "channel", "group", "block"]
# A layer's ROLE in the model, never its tensor layout. experts: one routed expert's projection,
# a plain [N, K] linear like any other (served by the same kernels; the MoE block only decides
# which tokens reach it); whether a checkpoint stacks experts as [E, N, K] is the weight's
# layout (`QuantWeight.lead`), decided by the format. router: MoE gate, always computed in fp32.
LayerKind = Literal["linear", "experts", "router", "embedding", "lm_head"]
# The roles whose weight is multiplied by activations in the compute dtype: what matmul kernels serve.
MATMUL_KINDS: frozenset[str] = frozenset(("linear", "experts", "lm_head"))
# MoE routers (kind "router": the gate, Qwen2-MoE's shared_expert_gate) are computed in fp32 from
# an fp32 weight: expert selection flips on tiny logit differences. The loader gives them fp32
# kernels and parameters (`layer_compute_dtype`), the MoE block feeds them fp32 inputs, `anyquant
# quantize` writes them unquantized (`ROUTER_UNQUANTIZED`), and one a checkpoint stores quantized
# runs on the reference kernel's fp32 dequantize-then-matmul (routers are not in MATMUL_KINDS).
ROUTER_DTYPE = torch.float32
ROUTER_UNQUANTIZED = "MoE routers stay unquantized (expert selection flips on small logit errors)"
ActType = Literal["int8", "fp8_e4m3", "fp8_e5m2"]
ActGranularity = Literal["tensor", "token", "group"]

# Views of the weight-type table (weight_types.py declares every type's traits).
UINT_BITS: dict[str, int] = {name: t.bits for name, t in WEIGHT_TYPES.items() if t.is_uint}
FP8_MAX: dict[str, float] = {name: t.code_max for name, t in WEIGHT_TYPES.items() if t.is_float}


@dataclass(frozen=True)
class ActQuant:
    """How activations are quantized before the matmul (W8A8-style schemes)."""

    type: ActType
    dynamic: bool  # True: scale computed from each input; False: stored `input_scale`
    granularity: ActGranularity = "token"  # token: one scale per row of x
    group_size: int = 0  # only for "group": one scale per token per group of input channels
    symmetric: bool = True  # False only for static int8 with a stored input zero point
    # Dynamic scale = amax / scale_divisor. None: the type's largest value (127, 448, 57344), which
    # serving kernels (vLLM, lmdeploy) use. compressed-tensors' own reference divides int8 amax by
    # 127.5 ((qmax - qmin) / 2); we follow each checkpoint's reference loader.
    scale_divisor: float | None = None

    def __post_init__(self) -> None:
        if self.scale_divisor is not None and self.scale_divisor <= 0:
            raise ValueError(f"scale_divisor must be positive, got {self.scale_divisor}")
        if self.granularity == "group" and self.group_size <= 0:
            raise ValueError("group activation quantization needs a positive group_size")
        if self.dynamic and not self.symmetric:
            raise ValueError("dynamic asymmetric activation quantization is not supported")

    def describe(self) -> str:
        how = "dynamic" if self.dynamic else "static"
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        sym = "" if self.symmetric else " asym"
        return f"{self.type} {how} per-{gran}{sym}"


@dataclass(frozen=True)
class QuantSpec:
    """Canonical description of one quantized weight.

    Dequantized value = (code - zero) * scale (+ offset, with has_offset). Unsigned types without
    stored zero points use the implicit zero 2^(bits-1), except with a float offset (then 0: the
    offset carries the minimum); int8 without zero points uses 0; fp8 has no zero.
    """

    weight: WeightType
    granularity: Granularity
    group_size: int = 0  # only for "group"
    block_shape: tuple[int, int] = (0, 0)  # (out, in), only for "block"
    has_zero: bool = False  # asymmetric: zero points stored per scale entry
    # A float offset added per scale entry after scaling: value = code * scale + offset. GGUF's
    # k-quants (Q2_K, Q4_K, Q5_K) and Q4_1 / Q5_1 store a float minimum per sub-block (the product
    # of two fp16/6-bit factors), which no integer zero point can express exactly.
    has_offset: bool = False
    act: ActQuant | None = None  # None: weight-only
    act_order: bool = False  # GPTQ act-order: input columns map to groups through group_index
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # format notes for display

    def __post_init__(self) -> None:
        traits = self.traits  # an unknown weight type fails here, naming the known ones
        if self.granularity == "group":
            if self.group_size <= 0 or self.group_size % 8:
                raise ValueError(f"group size must be a positive multiple of 8, got {self.group_size}")
        elif self.group_size:
            raise ValueError(f"group_size is only meaningful for group granularity, not {self.granularity}")
        if self.granularity == "block" and min(self.block_shape) <= 0:
            raise ValueError(f"block granularity needs a positive block_shape, got {self.block_shape}")
        if self.act_order and self.granularity != "group":
            raise ValueError("act_order needs group granularity")
        if self.is_float and self.has_zero:
            raise ValueError("fp8 weights have no zero points")
        if self.has_offset and (
            self.has_zero or self.act_order or not self.is_uint or self.granularity != "group"
        ):
            raise ValueError("a float offset needs unsigned codes with group scales and no zero points")
        if self.granularity not in traits.granularities:
            allowed = " or ".join(sorted(traits.granularities))
            raise ValueError(f"{self.weight} weights need {allowed} scales, not {self.granularity}")

    @property
    def traits(self) -> WeightTypeTraits:
        return weight_traits(self.weight)

    @property
    def is_uint(self) -> bool:
        return self.traits.is_uint

    @property
    def is_float(self) -> bool:
        return self.traits.is_float

    @property
    def bits(self) -> int:
        return self.traits.bits

    @property
    def implicit_zero(self) -> int:
        """Zero point used when none is stored (0 with a float offset: the offset holds the minimum)."""
        return 0 if self.has_offset else self.traits.implicit_zero

    def describe(self) -> str:
        """Short human description, e.g. 'uint4 group128 asym act-order, w-only'."""
        if self.granularity == "group":
            gran = f"group{self.group_size}"
        elif self.granularity == "block":
            gran = f"block{self.block_shape[0]}x{self.block_shape[1]}"
        else:
            gran = f"per-{self.granularity}"
        parts = [self.weight, gran]
        if self.has_offset:
            parts.append("offset")
        elif not self.is_float:
            parts.append("asym" if self.has_zero else "sym")
        if self.act_order:
            parts.append("act-order")
        parts.append(f"act {self.act.describe()}" if self.act else "weight-only")
        return " ".join(parts)


def layer_compute_dtype(kind: LayerKind, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer of role `kind` computes in: ROUTER_DTYPE for routers, else the model's."""
    return ROUTER_DTYPE if kind == "router" else model_dtype
