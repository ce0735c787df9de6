"""The LM head's storage choice at load: as the checkpoint stores it, or int8 (`--lm-head-dtype`).

The LM head is the largest matrix a small model reads per decode token (Qwen2.5-0.5B: 151936 x
896, 272 MB in bf16, more than half of a W4A16 step's bytes). `int8` quantizes an unquantized
head at load, per output row (vocabulary entry), symmetric round-to-nearest: half the bytes, one
fp32 scale per row; its cost in perplexity is measured in benchmarks/RESULTS.md. A head the
checkpoint already stores quantized is kept as stored. Owns the accepted values and the
row-chunked quantization (per-row scales make chunks independent, so the fp32 temporaries stay a
chunk, not the whole vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.errors import AnyquantError
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight

LM_HEAD_DTYPES = ("auto", "int8")
INT8_HEAD = QuantSpec("int8", "channel")
_CHUNK_ROWS = 8192


def lm_head_spec(lm_head_dtype: str) -> QuantSpec | None:
    """The spec an unquantized LM head is quantized to at load, or None to keep it as stored."""
    if lm_head_dtype not in LM_HEAD_DTYPES:
        raise AnyquantError(
            f"lm_head_dtype {lm_head_dtype!r} is not supported; choose {', '.join(LM_HEAD_DTYPES)}"
        )
    return INT8_HEAD if lm_head_dtype == "int8" else None


def quantize_rows(dense: Tensor, spec: QuantSpec) -> QuantWeight:
    """Per-row (channel) round-to-nearest quantization of [N, K], a chunk of rows at a time."""
    if spec.granularity != "channel":
        raise ValueError(f"row-chunked quantization needs per-channel scales, not {spec.granularity}")
    parts = [quantize_rtn(dense[i : i + _CHUNK_ROWS], spec) for i in range(0, dense.shape[0], _CHUNK_ROWS)]
    data = torch.cat([p.data for p in parts])
    scale = torch.cat([p.scale for p in parts])
    return QuantWeight(spec, (int(dense.shape[0]), int(dense.shape[1])), data, scale)
