"""Activation quantization chosen at load (`--activation-dtype int8`) for weight-only layers.

`auto` runs every layer as its checkpoint specifies: a weight-only (W4A16, W8A16) layer multiplies
the unquantized activations (bf16/fp32 dot products on CPU). `int8` quantizes those activations
per token at run time (dynamic symmetric int8, scale = amax / 127, as vLLM's and llama.cpp's int8
activation paths do), so integer weights multiply on the CPU's int8 dot-product units (AVX512-VNNI,
twice the multiply-adds per instruction). It changes results: the error budget and perplexity
cost are in benchmarks/RESULTS.md, which is why it is opt-in. It applies to integer weight-only
linear layers, routed experts (then one fused int8 call per MoE layer, avx512_moe_vnni.py) and a
quantized (or `--lm-head-dtype int8`) LM head; layers whose checkpoint already quantizes
activations, fp8 weights and unquantized layers keep their own numerics.
"""

from __future__ import annotations

import dataclasses

from anyquant.errors import AnyquantError
from anyquant.quant.spec import ActQuant, LayerKind, QuantSpec

ACTIVATION_DTYPES = ("auto", "int8")
INT8_PER_TOKEN = ActQuant("int8", dynamic=True)
_KINDS = ("linear", "experts", "lm_head")


def activation_quant(activation_dtype: str) -> ActQuant | None:
    """The activation quantization weight-only layers get at load, or None to keep them as stored."""
    if activation_dtype not in ACTIVATION_DTYPES:
        raise AnyquantError(
            f"activation_dtype {activation_dtype!r} is not supported; choose {', '.join(ACTIVATION_DTYPES)}"
        )
    return INT8_PER_TOKEN if activation_dtype == "int8" else None


def with_activations(spec: QuantSpec | None, kind: LayerKind, act: ActQuant | None) -> QuantSpec | None:
    """`spec` with `act` where it applies (an integer weight-only linear, expert or LM head layer), else `spec`."""
    if act is None or spec is None or spec.act is not None or kind not in _KINDS:
        return spec
    if not (spec.is_uint or spec.weight == "int8"):
        return spec
    return dataclasses.replace(spec, act=act)
