"""How far a quantized weight is from the dense weight it was made from: `relative_error`.

Pure arithmetic on a canonical `QuantWeight` (dequantized by the reference); `anyquant quantize`
and `anyquant convert` report it per layer.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from anyquant.quant.reference import dequantize
from anyquant.quant.weight import QuantWeight

# Elements per block of rows when measuring the quantization error (float64 temporaries).
_ERROR_BLOCK = 1 << 20


def relative_error(dense: Tensor, weight: QuantWeight) -> float:
    """||W - deq(Q(W))|| / ||W|| in float64, a block of rows at a time: the float64 temporaries
    of a whole large layer (an LM head) would be eight times its bf16 size, three times over."""
    n, k = weight.shape
    step = weight.spec.block_shape[0] if weight.spec.granularity == "block" else 1
    rows = max(step, _ERROR_BLOCK // max(k, 1) // step * step)
    diff = total = 0.0
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        part = dense[..., start:stop, :].double()
        deq = dequantize(_row_block(weight, start, stop), torch.float64)
        diff += float((deq - part).square().sum())
        total += float(part.square().sum())
    return (diff / max(total, 1e-60)) ** 0.5


def _row_block(weight: QuantWeight, start: int, stop: int) -> QuantWeight:
    """Rows [start, stop) of a weight (`start` a multiple of the block height for block scales)."""
    spec = weight.spec
    if spec.granularity == "tensor":
        scale, zero = weight.scale, weight.zero
    elif spec.granularity == "block":
        bn = spec.block_shape[0]
        scale = weight.scale[..., start // bn : -(-stop // bn), :]
        zero = None if weight.zero is None else weight.zero[..., start // bn : -(-stop // bn), :]
    elif spec.granularity == "channel":
        scale = weight.scale[..., start:stop]
        zero = None if weight.zero is None else weight.zero[..., start:stop]
    else:
        scale = weight.scale[..., start:stop, :]
        zero = None if weight.zero is None else weight.zero[..., start:stop, :]
    data = weight.data[..., start:stop, :]
    return replace(weight, shape=(stop - start, weight.shape[1]), data=data, scale=scale, zero=zero)
