"""Fast CPU kernels built on stock PyTorch ops: int4 and int8 weight-only, W8A8 int8, fp8 weights.

Owns the CPU layouts (torch's int4pack, int8 codes, fp8 bytes), the repacking at load, and the
per-call choice between torch's fused weight-only ops (fast for a few tokens, but vectorized only
for bfloat16 on x86) and a chunked dequantize-then-matmul path (any dtype, any token count). It
does not define numerics: the reference kernel does, and tests/kernels/test_cpu_kernels.py holds
every kernel here to it. Every rejection is a sentence, because `anyquant inspect` prints it.

One module per kernel (int4.py, int8.py, w8a8.py, fp8.py) over the shared checks, padding and
chunking of chunking.py. Importing this package registers the four kernels.
"""

from anyquant.quant.kernels.torch_cpu.fp8 import CpuFp8DequantKernel, _fp8_to_float32
from anyquant.quant.kernels.torch_cpu.int4 import CpuInt4Kernel, _act_order_permutation, _int4pack_layout
from anyquant.quant.kernels.torch_cpu.int8 import CpuInt8WeightKernel
from anyquant.quant.kernels.torch_cpu.w8a8 import CpuW8A8Int8Kernel, _quantize_int8_activations

# The underscored names are re-exported for their existing importers (the AVX-512 kernel takes the
# act-order permutation, the kernel tests the fp8 table, the int4pack probe and the activation
# quantizer).
__all__ = [
    "CpuFp8DequantKernel",
    "CpuInt4Kernel",
    "CpuInt8WeightKernel",
    "CpuW8A8Int8Kernel",
    "_act_order_permutation",
    "_fp8_to_float32",
    "_int4pack_layout",
    "_quantize_int8_activations",
]
