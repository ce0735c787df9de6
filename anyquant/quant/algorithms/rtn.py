"""Round-to-nearest quantization: dense weight + QuantSpec -> QuantWeight.

Used only by `anyquant quantize` and tests. It follows the producers' own formulas
(formats.md §2.2, §3.5, §4.2, §5) and rounds scales to the dtype the target format stores them
in *before* computing codes, so that encode -> decode reproduces exactly what was quantized.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.quant.reference import expand_to_columns
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight, num_groups


def act_order_group_index(dense: Tensor, group_size: int) -> Tensor:
    """A real (non-trivial) act-order group index without calibration data.

    GPTQ's desc_act visits input channels in decreasing Hessian-diagonal order and forms groups
    of consecutive visited channels. Without activations we use the column norm of the weight as
    the importance proxy; the resulting g_idx has exactly the structure real files have.
    """
    k = dense.shape[-1]
    importance = dense.float().reshape(-1, k).norm(dim=0)
    order = torch.argsort(importance, descending=True, stable=True)
    gidx = torch.empty(k, dtype=torch.int32)
    gidx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return gidx


def _reduce(dense: Tensor, spec: QuantSpec, gidx: Tensor | None, fn: str) -> Tensor:
    """Per-scale-entry reduction of a [E?, N, K] fp32 tensor.

    fn: "amax" = max |w|; "amin" = min w; "amax_pos" = max(max w, 0) (group strategy seeds with 0).
    """
    if fn == "amax_pos" and spec.granularity != "group":
        return _reduce(dense.clamp(min=0), spec, gidx, "amax")
    n, k = dense.shape[-2:]
    if spec.granularity == "tensor":
        flat = dense.reshape(*dense.shape[:-2], -1)
        return flat.abs().amax(dim=-1) if fn == "amax" else flat.amin(dim=-1)
    if spec.granularity == "channel":
        return dense.abs().amax(dim=-1) if fn == "amax" else dense.amin(dim=-1)
    if spec.granularity == "group":
        g = spec.group_size
        ng = num_groups(k, g)
        cols = gidx.long() if gidx is not None else torch.arange(k) // g
        fill = float("inf") if fn == "amin" else 0.0
        out = torch.full((*dense.shape[:-1], ng), fill)
        src = dense.abs() if fn == "amax" else dense
        reduce = "amin" if fn == "amin" else "amax"
        return out.scatter_reduce(-1, cols.expand_as(dense), src, reduce=reduce, include_self=True)
    bn, bk = spec.block_shape
    rows, cols_ = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(dense.abs(), (0, cols_ * bk - k, 0, rows * bn - n))
    blocks = padded.reshape(*dense.shape[:-2], rows, bn, cols_, bk)
    return blocks.amax(dim=(-3, -1))


def _expand(values: Tensor, spec: QuantSpec, shape: tuple[int, int], gidx: Tensor | None) -> Tensor:
    n, k = shape
    if spec.granularity == "tensor":
        return values.reshape(*values.shape, 1, 1)
    if spec.granularity == "channel":
        return values.unsqueeze(-1)
    if spec.granularity == "group":
        return expand_to_columns(values, spec, k, gidx)
    bn, bk = spec.block_shape
    return values.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def quantize_rtn(
    dense: Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype = torch.float32,
    group_index: Tensor | None = None,
) -> QuantWeight:
    """Quantize a [N, K] (or [E, N, K]) float weight with round-to-nearest."""
    w = dense.float()
    shape = (w.shape[-2], w.shape[-1])
    gidx = group_index
    if spec.act_order and gidx is None:
        gidx = act_order_group_index(w, spec.group_size)

    def rounded(s: Tensor) -> Tensor:
        # A group of zeros would get scale 0; any finite non-zero scale reproduces it exactly.
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s.to(scale_dtype).float()

    zero: Tensor | None = None
    traits = spec.traits
    if spec.is_float:
        top = traits.code_max
        scale = rounded(_reduce(w, spec, gidx, "amax") / top)
        data = (w / _expand(scale, spec, shape, gidx)).clamp(-top, top).to(traits.code_dtype)
    elif not spec.is_uint and not spec.has_zero:
        scale = rounded(_reduce(w, spec, gidx, "amax") / traits.symmetric_max)
        codes = torch.round(w / _expand(scale, spec, shape, gidx))
        data = codes.clamp(int(traits.code_min), int(traits.code_max)).to(traits.code_dtype)
    else:
        lo_code = int(traits.code_min)
        qmax = int(traits.code_max) - lo_code
        if spec.has_zero:
            # GPTQ/AWQ convention: the range always includes 0 so that 0 is exactly representable.
            xmin = _reduce(w, spec, gidx, "amin").clamp(max=0)
            xmax = _reduce(w, spec, gidx, "amax_pos")
            scale = rounded((xmax - xmin) / qmax)
            zero = (torch.round(-xmin / scale) + lo_code).clamp(lo_code, lo_code + qmax).to(torch.int32)
            z = _expand(zero, spec, shape, gidx)
        else:
            scale = rounded(_reduce(w, spec, gidx, "amax") / (qmax / 2))
            z = torch.tensor(spec.implicit_zero)
        codes = torch.round(w / _expand(scale, spec, shape, gidx)) + z
        data = codes.clamp(lo_code, lo_code + qmax).to(traits.code_dtype)
    return QuantWeight(spec, shape, data, scale, zero, gidx if spec.act_order else None)
