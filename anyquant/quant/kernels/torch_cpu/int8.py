"""cpu_int8_weight: int8 / uint8 weight-only (W8A16) with torch's fused int8 op or chunks."""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.quant.kernels.base import check_weight, round_up
from anyquant.quant.kernels.torch_cpu.chunking import (
    _CHUNK_ELEMENTS,
    TorchCpuKernel,
    _aligned,
    _chunked_linear,
    _finish,
    _fused_ops_vectorized,
    _pad_columns,
    _round_to,
    _Scratch,
)
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight

# Token counts up to which torch's fused int8 weight-only op beats dequantize-then-matmul (bfloat16,
# measured by benchmarks/linear_kernels.py on Qwen2.5-0.5B shapes), as for int4 (int4.py).
_INT8_FUSED_MAX_TOKENS = 32


@register_kernel
class CpuInt8WeightKernel(TorchCpuKernel):
    """int8 symmetric per-channel or per-tensor weights (and uint8 symmetric per-channel).

    uint8 with the implicit zero 128 is stored as int8 code - 128, which is exact. bfloat16 with
    at most `_INT8_FUSED_MAX_TOKENS` tokens runs `_weight_int8pack_mm` (scale rounded to bfloat16,
    fp32 accumulation); otherwise chunks of rows are dequantized in fp32, rounded once and
    multiplied. Stored: 1 byte per weight and one fp32 scale per row.
    """

    name = "cpu_int8_weight"
    priority = 50
    codes: Tensor  # int8 [N, Kpad]
    scale: Tensor  # fp32 [N]
    scale_op: Tensor | None  # compute dtype [N], fused op only

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        if spec.traits.cpu_layout != "int8":
            return f"weights are {spec.weight}; this kernel runs int8 and uint8"
        if spec.act is not None:
            return f"activations are quantized ({spec.act.describe()}); this kernel is weight-only"
        if spec.has_zero:
            return "asymmetric (zero points): (code - zero) does not fit int8 in general"
        if spec.granularity == "group":
            return f"group scales (group {spec.group_size}); the int8 mm op has one scale per output channel"
        if spec.granularity not in ("channel", "tensor"):
            return f"{spec.granularity} scales; this kernel takes per-channel or per-tensor scales"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = check_weight(weight, self)
        n, k = self.shape
        codes = w.data
        if w.spec.weight == "uint8":  # implicit zero 128: code - 128 is in [-128, 127], exact
            codes = (codes.to(torch.int16) - w.spec.implicit_zero).to(torch.int8)
        # The fused op steps through K 16 at a time with aligned loads: pad K to 64 with zeros.
        self.k_pad = round_up(k, 64)
        padded = torch.zeros(n, self.k_pad, dtype=torch.int8)
        padded[:, :k] = codes
        self.register_buffer("codes", padded, persistent=False)
        scale = w.scale.float().reshape(-1).expand(n).contiguous()  # tensor scale -> every row
        self.register_buffer("scale", scale, persistent=False)
        self.fused = self.compute_dtype == torch.bfloat16 and _fused_ops_vectorized()
        self.register_buffer(
            "scale_op", scale.to(self.compute_dtype) if self.fused else None, persistent=False
        )

    def _dense_rows(self, r0: int, r1: int, scratch: _Scratch) -> Tensor:
        w = scratch.get("fp32", (r1 - r0, self.k_pad), torch.float32).copy_(self.codes[r0:r1])
        return _round_to(w.mul_(self.scale[r0:r1, None]), self.compute_dtype, scratch)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        x = _pad_columns(x, self.k_pad)
        if self.fused and x.shape[0] <= _INT8_FUSED_MAX_TOKENS:
            y = torch.ops.aten._weight_int8pack_mm(_aligned(x), self.codes, self.scale_op)
            return _finish(y, n, bias)
        bias = None if bias is None else bias.to(self.compute_dtype)
        y = _chunked_linear(x, n, max(1, _CHUNK_ELEMENTS // self.k_pad), self._dense_rows, bias)
        return _finish(y, n, None)
