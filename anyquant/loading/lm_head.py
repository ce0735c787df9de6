"""The LM head's storage choice at load: as the checkpoint stores it, int8 or int4 (`--lm-head-dtype`).

The LM head is the largest matrix a small or MoE model reads per decode token (Qwen2.5-0.5B:
151936 x 896, 272 MB in bf16, more than half of a W4A16 step's bytes; a Qwen3-30B-A3B step reads
its 151936 x 2048 head, 594 MiB in bf16, against ~56 MiB of routed experts per layer-set). An
unquantized head is quantized at load with round-to-nearest:
  - `int8`: per output row (vocabulary entry), symmetric; half the bf16 bytes, one fp32 scale per row;
  - `int4`: per group of 128 inputs of a row, asymmetric (`INT4_HEAD`): 4.5 bits per weight
    (codes plus the kernel's fp32 scale and zero point per group), 0.55 of int8's bytes. On
    stories260K asymmetric groups cost 0.8 points less perplexity than symmetric ones at the same
    bytes (benchmarks/RESULTS.md); 128 is the body's own group size (that model's rows, 64
    inputs, are too short to tell 64 from 128).
A head the checkpoint already stores quantized is kept as stored. Owns the accepted values, the
bytes a quantized head holds, and the row-chunked quantization: scales are per row or per group
of a row, so chunks of rows are independent and the fp32 temporaries stay a chunk, not the whole
vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.errors import AnyquantError
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups

LM_HEAD_DTYPES = ("auto", "int8", "int4")
INT8_HEAD = QuantSpec("int8", "channel")
INT4_HEAD = QuantSpec("uint4", "group", group_size=128, has_zero=True)
_CHUNK_ROWS = 8192


def lm_head_spec(lm_head_dtype: str) -> QuantSpec | None:
    """The spec an unquantized LM head is quantized to at load, or None to keep it as stored."""
    if lm_head_dtype not in LM_HEAD_DTYPES:
        raise AnyquantError(
            f"lm_head_dtype {lm_head_dtype!r} is not supported; choose {', '.join(LM_HEAD_DTYPES)}"
        )
    return {"int8": INT8_HEAD, "int4": INT4_HEAD}.get(lm_head_dtype)


def held_bytes(spec: QuantSpec, rows: int, cols: int) -> int:
    """Bytes a head quantized at load to `spec` holds (and a decode step reads): packed codes plus
    the fp32 scale (and zero point) per row or group, as the CPU kernels keep them."""
    per_row = 1 if spec.granularity == "channel" else num_groups(cols, spec.group_size)
    entries = 2 if spec.has_zero else 1
    return rows * (cols * spec.bits // 8 + 4 * entries * per_row)


def quantize_rows(dense: Tensor, spec: QuantSpec) -> QuantWeight:
    """Round-to-nearest quantization of [N, K] with per-row or per-group scales, a chunk of rows at
    a time."""
    if spec.granularity not in ("channel", "group") or spec.act_order:
        raise ValueError(f"row-chunked quantization needs scales within a row, not {spec.describe()}")
    parts = [quantize_rtn(dense[i : i + _CHUNK_ROWS], spec) for i in range(0, dense.shape[0], _CHUNK_ROWS)]
    data = torch.cat([p.data for p in parts])
    scale = torch.cat([p.scale for p in parts])
    zeros = [p.zero for p in parts if p.zero is not None]
    zero = torch.cat(zeros) if zeros else None
    return QuantWeight(spec, (int(dense.shape[0]), int(dense.shape[1])), data, scale, zero)
