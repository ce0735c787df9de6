"""A GGUF model as a `Checkpoint`: the one loading path reads it like a transformers directory.

Owns presenting a GGUF file under transformers names with the config its metadata implies, and
reading its tensors: a linear layer's quantized blocks as raw bytes [rows, bytes per row] (U8),
decoded by the `gguf` quant format into the canonical weight like any other format; float
tensors as they are; quantized non-linear tensors (a token embedding) dequantized to float32
here, since embeddings are looked up, not multiplied. Everything but `read` uses headers only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import TensorError
from anyquant.loading.checkpoint import Checkpoint, QuantConfigSource, TensorIndex, TensorInfo
from anyquant.loading.gguf_deepseek import deepseek_layout, join_kv_b
from anyquant.loading.gguf_file import GgufFile, GgufTensor
from anyquant.loading.gguf_layout import MappedTensor, architecture, build_layout, rotate_half_rows
from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES, FLOAT_TYPES, decode_rows

_SAFETENSORS_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class GgufCheckpoint(Checkpoint):
    """Same interface as the safetensors `Checkpoint` (the loader, the preflight and `inspect` take
    either); construction parses the GGUF metadata and tensor table, no tensor data."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.gguf = GgufFile(path)
        self.path = self.gguf.path
        layout = (deepseek_layout if architecture(self.gguf) == "deepseek2" else build_layout)(self.gguf)
        self.config = layout.config
        self._mapped = layout.tensors
        self.files = [p.name for p in self.gguf.parts]
        self.metadata: dict[str, dict[str, str]] = {f: {} for f in self.files}
        self.index = TensorIndex(self._info(m) for m in self._mapped.values())
        self._handles: dict[str, Any] = {}

    def _info(self, m: MappedTensor) -> TensorInfo:
        t = m.gguf
        nbytes, begin = t.nbytes, t.offset
        if m.mla_values is not None:  # two stored tensors, joined in float32 when read
            return TensorInfo(m.name, t.file.name, "F32", m.shape, (begin, begin + nbytes))
        if m.expert is not None:  # one expert's slice of a stacked tensor
            nbytes //= t.shape[0]
            begin += m.expert * nbytes
        if t.ggml_type in FLOAT_TYPES:
            dtype, shape = _SAFETENSORS_NAME[FLOAT_TYPES[t.ggml_type]], m.shape
        elif t.ggml_type not in BLOCK_TYPES:
            raise TensorError(
                t.name,
                f"GGML type {t.ggml_type} is not supported; anyquant reads "
                f"{', '.join([*FLOAT_TYPES, *BLOCK_TYPES])}",
                file=str(t.file),
            )
        elif m.linear:
            dtype, shape = "U8", (*m.shape[:-1], nbytes // max(1, _rows(m.shape)))
        else:
            dtype, shape = "F32", m.shape
        return TensorInfo(m.name, t.file.name, dtype, tuple(shape), (begin, begin + nbytes))

    def quant_config(self) -> QuantConfigSource | None:
        """A `gguf` section naming each quantized linear weight's GGML type (detect_format then
        picks the gguf format like any quant_method); None when every linear weight is float."""
        types = {
            name: m.gguf.ggml_type
            for name, m in self._mapped.items()
            if m.linear and m.gguf.ggml_type in BLOCK_TYPES
        }
        if not types:
            return None
        return QuantConfigSource({"quant_method": "gguf", "tensor_types": types}, "GGUF tensor types")

    def text_config(self) -> dict[str, Any]:
        return self.config

    def read_side_json(self, name: str) -> dict[str, Any]:
        return {}

    def ggml_type(self, name: str) -> str:
        return self._mapped[name].gguf.ggml_type

    def read(self, name: str) -> Tensor:
        info = self.index.info(name)
        m = self._mapped[name]
        t = m.gguf
        if m.mla_values is not None:
            return join_kv_b(_float32(name, t), _float32(name, m.mla_values))
        try:
            data = torch.from_numpy((t.data if m.expert is None else t.data[m.expert]).copy())
        except Exception as exc:  # the mapping fails on I/O errors of the underlying file
            raise TensorError(name, f"cannot read data: {exc}", file=str(t.file)) from exc
        if t.ggml_type == "BF16":
            data = data.view(torch.bfloat16)
        elif t.ggml_type in BLOCK_TYPES and not m.linear:
            data = _dequantize(t.ggml_type, data.view(torch.uint8), m.shape)
        data = data.reshape(info.shape)
        if m.interleaved_heads:
            data = rotate_half_rows(data, m.interleaved_heads, name)
        return data

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        info = self.index.info(name)
        if len(info.shape) != 2 or dim not in (0, 1) or not 0 <= start <= stop <= info.shape[dim]:
            raise TensorError(
                name, f"cannot read [{start}, {stop}) along dim {dim} of shape {list(info.shape)}"
            )
        whole = self.read(name)
        return (whole[start:stop] if dim == 0 else whole[:, start:stop]).contiguous()

    def close(self) -> None:
        self._handles.clear()


def _float32(name: str, t: GgufTensor) -> Tensor:
    """One stored tensor of any type as float32 in its PyTorch shape."""
    try:
        data = torch.from_numpy(t.data.copy())
    except Exception as exc:
        raise TensorError(name, f"cannot read {t.name}: {exc}", file=str(t.file)) from exc
    if t.ggml_type in BLOCK_TYPES:
        return _dequantize(t.ggml_type, data.view(torch.uint8), t.shape)
    if t.ggml_type == "BF16":
        data = data.view(torch.bfloat16)
    return data.float().reshape(t.shape)


def _rows(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def _dequantize(ggml_type: str, raw: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Blocks -> float32 through the canonical translation and the reference dequantization."""
    from anyquant.quant.reference import dequantize
    from anyquant.quant.weight import QuantWeight

    kind = BLOCK_TYPES[ggml_type]
    rows = _rows(shape)
    codes, scale, offset = decode_rows(kind, raw.reshape(rows, -1))
    weight = QuantWeight(kind.spec, (rows, shape[-1]), codes, scale, offset=offset)
    return dequantize(weight, torch.float32).reshape(shape)
