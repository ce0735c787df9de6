"""RMSNorm, computed in fp32 whatever the compute dtype (bf16/fp16 squares lose too much).

The weight's fp32 copy is made once (not on every call), and the residual add that precedes a norm
goes with it (`add_rms_norm`), so a decoder block converts into its compute dtype once per norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Inputs larger than this many elements are normalised a slice of rows at a time (RMSNorm.forward).
_SLICE_ELEMENTS = 1 << 20


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self._weight_f32: Tensor | None = None
        self._weight_key: tuple[int, int, torch.dtype] | None = None  # what `_weight_f32` was made from

    def weight_f32(self) -> Tensor:
        if torch.compiler.is_compiling():
            # Traced: the cast is one node that Inductor folds into the norm's kernel (the cache
            # below reads data_ptr(), which a trace cannot).
            return self.weight.float()
        # Loading, `.to()` and in-place edits change the storage, its version or the dtype.
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if key != self._weight_key or self._weight_f32 is None:
            self._weight_f32 = w.detach() if w.dtype == torch.float32 else w.detach().float()
            self._weight_key = key
        return self._weight_f32

    def forward(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """Normalise in fp32; the result in `out_dtype` (default: x's dtype)."""
        dtype = out_dtype or x.dtype
        if x.numel() <= _SLICE_ELEMENTS or x.dim() < 2 or torch.compiler.is_compiling():
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight_f32(), self.eps).to(dtype)
        # A prefill chunk: a slice of rows at a time, so that the fp32 copy and the norm's own
        # fp32 temporaries stay a few MiB (whole, q_norm over a 2048-token chunk of 32 heads held
        # ~128 MiB at once, which the heap then kept). Each row is normalised alone: same result.
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        rows = max(1, _SLICE_ELEMENTS * x.shape[0] // x.numel())
        weight = self.weight_f32()
        for r in range(0, x.shape[0], rows):
            out[r : r + rows] = F.rms_norm(x[r : r + rows].float(), (x.shape[-1],), weight, self.eps)
        return out


def add_rms_norm(residual: Tensor, delta: Tensor, norm: RMSNorm, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """residual (fp32) + delta (any float dtype, promoted inside the add) -> (new residual in fp32,
    its normalisation in `dtype`)."""
    residual = residual + delta
    return residual, norm(residual, dtype)
