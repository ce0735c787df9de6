"""Independent references for the compressed-tensors tests.

Written from formats.md §4 / §12 only (no anyquant decoding code): a bit-matrix unpacker, float64
dequantizers of stored tensors and of canonical weights, the §12.0 generator, a 0.17.x padded
packer, and header-only tensor indexes. `library()` imports the real compressed-tensors package
(the third-party oracle) or returns the reason it cannot.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from anyquant.loading.checkpoint import TORCH_TO_SAFETENSORS, TensorIndex, TensorInfo
from anyquant.quant.weight import QuantWeight

# formats.md §12.0 (one home: tests/helpers/spec_vectors.py), under the names the tests use here.
from tests.helpers.spec_vectors import checksums as checksums
from tests.helpers.spec_vectors import hcode as hcode
from tests.helpers.spec_vectors import scale as vec_scale  # noqa: F401 - used as oc.vec_scale
from tests.helpers.spec_vectors import word_rows as words


def library() -> tuple[SimpleNamespace | None, str]:
    """The compressed-tensors pieces the tests drive, or (None, why not)."""
    try:
        helpers = importlib.import_module("compressed_tensors.compressors.pack_quantized.helpers")
        pack = importlib.import_module("compressed_tensors.compressors.pack_quantized.base")
        naive = importlib.import_module("compressed_tensors.compressors.naive_quantized.base")
        quant = importlib.import_module("compressed_tensors.quantization")
        scheme_mod = importlib.import_module("compressed_tensors.quantization.quant_scheme")
        fmt = importlib.import_module("compressed_tensors.compressors.format")
        models = importlib.import_module("compressed_tensors.compressors.model_compressors")
        top = importlib.import_module("compressed_tensors")
    except Exception as exc:  # any import failure means "no oracle", not a test failure
        return None, f"compressed-tensors is not importable ({type(exc).__name__}: {exc})"
    return (
        SimpleNamespace(
            version=top.__version__,
            pack_to_int32=helpers.pack_to_int32,
            unpack_from_int32=helpers.unpack_from_int32,
            Packed=pack.PackedQuantizationCompressor,
            Naive=naive.NaiveQuantizationCompressor,
            IntQ=naive.IntQuantizationCompressor,
            FloatQ=naive.FloatQuantizationCompressor,
            QuantizationScheme=quant.QuantizationScheme,
            QuantizationConfig=quant.QuantizationConfig,
            calculate_qparams=importlib.import_module(
                "compressed_tensors.quantization.utils"
            ).calculate_qparams,
            preset=scheme_mod.preset_name_to_scheme,
            infer_module_format=fmt.infer_module_format,
            ModelCompressor=models.ModelCompressor,
        ),
        "",
    )


# -- bit layouts, written as bit matrices (not shifts of windows) ------------------------------


def bit_matrix(words_: Tensor) -> Tensor:
    """[..., W] int32 -> [..., W*32] of 0/1, bit j of word w at position 32*w + j (LSB first)."""
    u = words_.to(torch.int64) & 0xFFFFFFFF
    bits = (u.unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.reshape(*words_.shape[:-1], -1)


def ref_unpack(words_: Tensor, bits: int, count: int) -> Tensor:
    """Dense LSB-first bitstream (formats.md §0.2 a) along the last dim -> int64 values."""
    flat = bit_matrix(words_)[..., : count * bits]
    vals = flat.reshape(*words_.shape[:-1], count, bits)
    return (vals << torch.arange(bits)).sum(-1)


def ref_unpack_padded(words_: Tensor, bits: int, count: int) -> Tensor:
    """compressed-tensors 0.17.x: floor(32/b) values per word, low bits first, top bits unused."""
    per = 32 // bits
    mat = bit_matrix(words_).reshape(*words_.shape[:-1], -1, 32)[..., : per * bits]
    vals = mat.reshape(*words_.shape[:-1], -1, bits)
    return (vals << torch.arange(bits)).sum(-1)[..., :count]


def ref_pack_padded(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes [R, C] -> 0.17.x padded words [R, ceil(C / floor(32/b))], in Python ints."""
    per = 32 // bits
    rows = []
    for row in codes.tolist():
        out = []
        for start in range(0, len(row), per):
            word = 0
            for i, v in enumerate(row[start : start + per]):
                word |= int(v) << (bits * i)
            out.append(word)
        rows.append(out)
    return words(rows)


# -- float64 dequantizers ----------------------------------------------------------------------


def ref_dequant_packed(
    stored: dict[str, Tensor], prefix: str, bits: int, group_size: int, symmetric: bool
) -> Tensor:
    """formats.md §4.2 formula on the stored tensors (packed zero points), float64 [N, K]."""
    n, k = (int(v) for v in stored[f"{prefix}.weight_shape"].tolist())
    u = ref_unpack(stored[f"{prefix}.weight_packed"], bits, k)
    scale = stored[f"{prefix}.weight_scale"].double()
    g = torch.arange(k) // group_size if group_size > 0 else torch.zeros(k, dtype=torch.long)
    if symmetric:
        zu = torch.full((n, scale.shape[1]), 1 << (bits - 1), dtype=torch.int64)
    else:
        zu = ref_unpack(stored[f"{prefix}.weight_zero_point"].T, bits, n).T
    return (u - zu[:, g]).double() * scale[:, g]


def canon_dense(w: QuantWeight) -> Tensor:
    """Canonical (code - zero) * scale in float64, written from the weight.py layout table."""
    n, k = w.shape
    spec = w.spec
    if spec.granularity == "tensor":
        s = w.scale.double().expand(n, k)
    elif spec.granularity == "channel":
        s = w.scale.double()[:, None].expand(n, k)
    elif spec.granularity == "group":
        cols = w.group_index.long() if w.group_index is not None else torch.arange(k) // spec.group_size
        s = w.scale.double()[:, cols]
    else:
        bn, bk = spec.block_shape
        s = w.scale.double()[torch.arange(n) // bn][:, torch.arange(k) // bk]
    if spec.is_float:
        return w.data.double() * s
    codes = w.data.to(torch.int64)
    if w.zero is not None:
        z = w.zero.to(torch.int64)
        if spec.granularity == "group":
            z = z[:, cols]
        elif spec.granularity == "channel":
            z = z[:, None]
        codes = codes - z
    elif spec.is_uint:
        codes = codes - (1 << (spec.bits - 1))
    return codes.double() * s


# -- header-only indexes -------------------------------------------------------------------------


def index_of(tensors: dict[str, Tensor]) -> TensorIndex:
    return index_from_headers(
        {n: (TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)) for n, t in tensors.items()}
    )


def index_from_headers(headers: dict[str, tuple[str, tuple[int, ...]]]) -> TensorIndex:
    infos = []
    for name, (dtype, shape) in headers.items():
        numel = 1
        for d in shape:
            numel *= d
        infos.append(TensorInfo(name, "model.safetensors", dtype, shape, (0, numel)))
    return TensorIndex(infos)


def ct_config(groups: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A compressed-tensors quantization_config around `groups`, 0.20.0-style defaults."""
    cfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.0",
    }
    cfg.update(top)
    return cfg


def int_weights(
    bits: int, strategy: str = "group", group_size: int | None = 128, symmetric: bool = True
) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size if strategy == "group" else None, "dynamic": False}  # fmt: skip


def group(weights: dict[str, Any] | None, fmt: str | None = None, targets: list[str] | None = None,
          acts: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    g: dict[str, Any] = {"targets": targets or ["Linear"], "weights": weights, "input_activations": acts,
                         "output_activations": None}  # fmt: skip
    if fmt is not None:
        g["format"] = fmt
    return g
