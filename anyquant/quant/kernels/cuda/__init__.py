"""CUDA linear kernels on PyTorch's own ops, behind the same `LinearKernel` interface as the CPU ones.

One module per kernel; importing this package registers them. The capability table chooses per
layer (highest priority first, each rejection a sentence for `inspect`):

| kernel | weights | activations | compute dtype | capability |
|---|---|---|---|---|
| cuda_int4_tinygemm | uint4/3/2 group or channel (act-order permuted) | weight-only | bfloat16 | 8.0 |
| cuda_w8a8_int8 | int8 sym channel/tensor | int8 dynamic token/tensor, static tensor | any | 7.5 |
| cuda_fp8_scaled_mm | fp8 e4m3 channel/tensor | fp8 e4m3 dynamic token/tensor, static tensor | bf16 (row-wise), any (tensor-wise) | 8.9 (row-wise 9.0) |
| cuda_dequant | every integer and fp8 spec but GGUF offsets | any (reference quantization) | any | 7.0 |

cuda_dequant is the fallback of older cards and fp16 (a T4): it keeps the codes packed and
dequantizes per call. On a real GPU each kernel must also pass a self-check on a small layer of
the same spec (self_check.py) before the table picks it. The reference kernel still answers
everything, on any device.
"""

from anyquant.quant.kernels.cuda.dequant import CudaDequantKernel
from anyquant.quant.kernels.cuda.fp8_scaled_mm import CudaFp8ScaledMMKernel
from anyquant.quant.kernels.cuda.int4_tinygemm import CudaInt4TinygemmKernel
from anyquant.quant.kernels.cuda.int8_mm import CudaW8A8Int8Kernel

__all__ = ["CudaDequantKernel", "CudaFp8ScaledMMKernel", "CudaInt4TinygemmKernel", "CudaW8A8Int8Kernel"]
