"""cuda_dequant: the fallback of every GPU, dtype and spec the fast kernels refuse (a T4 in fp16,
int8 weight-only, fp8 with block scales or on cards without fp8): dequantize the whole layer per
call on the GPU, then one cuBLAS matmul in the compute dtype with fp32 accumulation.

Codes stay packed (two 4-bit codes per byte, other types one byte), so memory is the quantized
size plus one transient dense copy of the layer being multiplied. Per call the weight is read
once packed and written once dense (memory-bound: slower than a dense layer of the same shape,
never wrong). Dequantization is the reference's: (q - zero) * scale in fp32, one rounding;
activation-quantized specs use the reference's own fake quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from anyquant.quant.kernels.base import check_weight, round_up
from anyquant.quant.kernels.cuda.base import CudaKernel, on_host
from anyquant.quant.kernels.torch_cpu.int4 import _act_order_permutation
from anyquant.quant.reference import fake_quantize_activations
from anyquant.quant.registry import register_kernel
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups


@register_kernel
class CudaDequantKernel(CudaKernel):
    name = "cuda_dequant"
    priority = 30
    codes: Tensor  # uint8 [N, Kpad / 2] (<= 4 bits: column 2j low nibble, 2j + 1 high) or [N, Kpad]
    scale: Tensor  # fp32 [N, groups] (tensor / channel: [N, 1]) or [Nb, Kb] blocks
    zero: Tensor | None  # fp32, like scale
    perm: Tensor | None
    input_scale: Tensor | None
    input_zero: Tensor | None

    @classmethod
    def rejects(cls, spec: QuantSpec, shape: tuple[int, int], compute_dtype: torch.dtype) -> str | None:
        return None  # every spec the shared pre-check admits (no GGUF offsets)

    def load(self, weight: QuantWeight | Tensor) -> None:
        w = check_weight(weight, self)
        spec, (n, k) = w.spec, w.shape
        self.spec = spec
        self.packed4 = spec.bits <= 4 and not spec.is_float
        # Pad K to whole groups / blocks (and an even count for two codes per byte), N to blocks.
        ng = 1
        if spec.granularity == "group":
            self.group = spec.group_size
            ng = num_groups(k, self.group)
            self.k_pad = ng * self.group
        elif spec.granularity == "block":
            self.group = spec.block_shape[1]
            self.k_pad = round_up(k, self.group)
        else:  # tensor / channel: one group spanning the padded row
            self.k_pad = round_up(k, 2 if self.packed4 else 1)
            self.group = self.k_pad
        self.n_pad = round_up(n, spec.block_shape[0]) if spec.granularity == "block" else n
        codes = w.data
        perm = None
        if spec.act_order:
            perm = _act_order_permutation(on_host(w.group_index), self.group, k).to(codes.device)
            codes = codes[:, perm]
        self.register_buffer("perm", perm, persistent=False)
        raw = codes.view(torch.uint8) if spec.is_float else codes  # fp8 bytes pad with +0.0
        fill = 0 if spec.is_float or not spec.is_uint else spec.implicit_zero
        padded = F.pad(raw, (0, self.k_pad - k, 0, self.n_pad - n), value=fill)
        if self.packed4:
            padded = padded[:, 0::2] | (padded[:, 1::2] << 4)
        self.register_buffer("codes", padded.contiguous(), persistent=False)
        if spec.granularity == "block":
            scale, zero = w.scale.float(), None
        else:
            scale = (
                w.scale.float().reshape(-1, 1).expand(n, 1)
                if spec.granularity != "group"
                else w.scale.float()
            )
            scale = scale.reshape(n, ng)
            zero = None
            if w.zero is not None:
                zero = (
                    w.zero.float().reshape(-1, 1).expand(n, 1)
                    if spec.granularity != "group"
                    else w.zero.float()
                )
                zero = zero.reshape(n, ng).contiguous()
            elif spec.is_uint and spec.implicit_zero:
                zero = torch.full_like(scale, float(spec.implicit_zero))
            scale = scale.contiguous()
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        self.register_buffer("input_scale", w.input_scale, persistent=False)
        self.register_buffer("input_zero", w.input_zero, persistent=False)
        act = spec.act
        self.dynamic_act = act if act is not None and act.dynamic else None

    def dense(self) -> Tensor:
        """The layer's weight [N, K] in the compute dtype (columns in act-order when permuted)."""
        n, k = self.shape
        spec = self.spec
        if self.packed4:
            low, high = self.codes & 0x0F, self.codes >> 4
            values = torch.stack((low, high), dim=-1).reshape(self.n_pad, self.k_pad).float()
        elif spec.is_float:
            values = self.codes.view(spec.traits.code_dtype).float()
        else:
            values = self.codes.float()
        if spec.granularity == "block":
            bn, bk = spec.block_shape
            blocks = values.view(self.n_pad // bn, bn, self.k_pad // bk, bk)
            dense = (blocks * self.scale[:, None, :, None]).view(self.n_pad, self.k_pad)
        else:
            grouped = values.view(self.n_pad, -1, self.group)  # [N, groups, G]
            if self.zero is not None:
                grouped = grouped - self.zero[:, :, None]
            dense = (grouped * self.scale[:, :, None]).view(self.n_pad, self.k_pad)
        return dense[:n, :k].to(self.compute_dtype)

    def forward(self, x: Tensor, bias: Tensor | None = None, act_amax: Tensor | None = None) -> Tensor:
        n = self.shape[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, n)
        act = self.spec.act
        if act is not None:
            x = fake_quantize_activations(x, act, self.input_scale, self.input_zero, act_amax)
        x = x.to(self.compute_dtype)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        return F.linear(x, self.dense(), None if bias is None else bias.to(self.compute_dtype))
