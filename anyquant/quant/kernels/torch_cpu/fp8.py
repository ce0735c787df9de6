"""cpu_fp8_dequant: fp8 weights dequantized in chunks (torch._scaled_mm on CPU is slower than a
dense matmul)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from anyquant.quant.kernels.base import check_weight, round_up
from anyquant.quant.kernels.torch_cpu.chunking import (
    _CHUNK_ELEMENTS,
    TorchCpuKernel,
    _chunked_linear,
    _finish,
    _pad_columns,
    _padded_bias,
    _round_to,
    _Scratch,
)
from anyquant.quant.reference import fake_quantize_activations
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight


@functools.cache
def _fp8_pair_table(dtype: torch.dtype) -> Tensor:
    """[65536] int64: the two fp32 values of each pair of adjacent fp8 bytes, from torch's cast.

    Looking up two codes at once halves the lookups; 512 KiB stays in L2. Built through the same
    int16 / int64 views that decode it, so it holds on either byte order.
    """
    single = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()  # NaN/Inf too
    pair_bytes = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(65536, 2)
    return single[pair_bytes.long()].contiguous().view(torch.int64).reshape(-1)


def _fp8_to_float32(codes: Tensor, scratch: _Scratch | None = None) -> Tensor:
    """fp8 [R, K] -> fp32 by table lookup, two codes at a time: exactly torch's cast, several
    times faster (torch's elementwise fp8 cast is a scalar loop on CPU)."""
    scratch = scratch or _Scratch()
    data = codes.reshape(-1).view(torch.uint8)
    if data.numel() % 2:  # one padding byte so the bytes pair up
        data = torch.cat((data, data.new_zeros(1)))
    pairs = data.view(torch.int16)
    index = scratch.get("index", (pairs.numel(),), torch.int32).copy_(pairs).bitwise_and_(0xFFFF)
    out = scratch.get("fp32", (data.numel(),), torch.float32)
    torch.index_select(_fp8_pair_table(codes.dtype), 0, index, out=out.view(torch.int64))
    return out[: codes.numel()].view(codes.shape)


@register_kernel
class CpuFp8DequantKernel(TorchCpuKernel):
    """fp8 (e4m3 / e5m2) weights with tensor, channel or block scales; any activation spec.

    Keeps the fp8 bytes (1 byte per weight) and dequantizes chunks of output rows per call in
    fp32, rounding once to the compute dtype like the reference; activation-quantized specs apply
    the reference's own fake quantization. No whole-layer float copy is kept.
    """

    name = "cpu_fp8_dequant"
    priority = 50
    codes: Tensor  # fp8 [Npad, Kpad]
    scale: Tensor  # fp32 [Npad, 1] or block [ceil(N/Bn), ceil(K/Bk)]
    input_scale: Tensor | None
    input_zero: Tensor | None

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        if spec.traits.cpu_layout != "fp8":
            return f"weights are {spec.weight}; this kernel runs fp8 weights"
        return None

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = check_weight(weight, self)
        spec = w.spec
        n, k = self.shape
        self.spec = spec
        bn, bk = spec.block_shape if spec.granularity == "block" else (1, k)
        # Block scales: pad to whole blocks so a chunk of rows reshapes into [rows/Bn, Bn, K/Bk, Bk].
        self.block = (bn, bk)
        self.n_pad, self.k_pad = round_up(n, bn), round_up(k, bk)
        codes = w.data
        if (self.n_pad, self.k_pad) != (n, k):
            codes = torch.zeros(self.n_pad, self.k_pad, dtype=w.data.dtype)
            codes[:n, :k] = w.data
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        if spec.granularity == "block":
            scale = w.scale.float()  # [ceil(N/Bn), ceil(K/Bk)]
        else:
            scale = w.scale.float().reshape(-1).expand(n).reshape(n, 1)
            scale = torch.cat((scale, scale.new_zeros(self.n_pad - n, 1))) if self.n_pad > n else scale
        self.register_buffer("scale", scale.contiguous(), persistent=False)
        self.register_buffer("input_scale", w.input_scale, persistent=False)
        self.register_buffer("input_zero", w.input_zero, persistent=False)
        self.dynamic_act = spec.act if spec.act is not None and spec.act.dynamic else None

    def _dense_rows(self, r0: int, r1: int, scratch: _Scratch) -> Tensor:
        w = _fp8_to_float32(self.codes[r0:r1], scratch)  # [rows, Kpad] fp32
        bn, bk = self.block
        if self.spec.granularity == "block":
            blocks = w.view((r1 - r0) // bn, bn, self.k_pad // bk, bk)
            blocks.mul_(self.scale[r0 // bn : r1 // bn, None, :, None])
        else:
            w.mul_(self.scale[r0:r1])
        return _round_to(w, self.compute_dtype, scratch)

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        act = self.spec.act
        if act is not None:
            x = fake_quantize_activations(x, act, self.input_scale, self.input_zero, act_amax)
            x = x.to(self.compute_dtype)
        x = _pad_columns(x, self.k_pad)
        rows = max(1, _CHUNK_ELEMENTS // self.k_pad)
        rows = round_up(rows, self.block[0])
        y = _chunked_linear(x, self.n_pad, rows, self._dense_rows, _padded_bias(bias, self.n_pad, x.dtype))
        return _finish(y, n, None)
