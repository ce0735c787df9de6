"""A GGUF model as a `Checkpoint`: the one loading path reads it like a transformers directory.

Owns presenting a GGUF file under transformers names with the config its metadata implies, and
reading its tensors: a linear layer's quantized blocks as raw bytes [rows, bytes per row] (U8),
decoded by the `gguf` quant format into the canonical weight like any other format; float
tensors as they are; quantized non-linear tensors (a token embedding) dequantized to float32
here, since embeddings are looked up, not multiplied. Everything but `read` uses headers only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import TensorError
from anyquant.loading.checkpoint import Checkpoint, QuantConfigSource, TensorIndex, TensorInfo
from anyquant.loading.gguf_deepseek import deepseek_layout
from anyquant.loading.gguf_file import GgufFile, GgufTensor
from anyquant.loading.gguf_layout import MappedTensor, architecture, build_layout, rotate_half_rows
from anyquant.loading.gguf_mmproj import add_vision, find_mmproj
from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES, FLOAT_TYPES, decode_rows

log = logging.getLogger(__name__)
_DEQUANT_CHUNK = 1 << 22  # elements per step of a dequantized table (16 MB of float32)
_SAFETENSORS_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class GgufCheckpoint(Checkpoint):
    """Same interface as the safetensors `Checkpoint` (the loader, the preflight and `inspect` take
    either); construction parses the GGUF metadata and tensor table, no tensor data."""

    def __init__(self, path: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None = None) -> None:
        """`mmproj`: a vision projector file for this language model; by default the one beside it
        when `path` is a directory."""
        self.gguf = GgufFile(path)
        self.path = self.gguf.path
        layout = (deepseek_layout if architecture(self.gguf) == "deepseek2" else build_layout)(self.gguf)
        self.config = layout.config
        self._mapped = layout.tensors
        self.files = [p.name for p in self.gguf.parts]
        projector = Path(mmproj) if mmproj is not None else find_mmproj(path)
        if projector is not None:
            add_vision(self.gguf, self.config, self._mapped, projector)
            self.files.append(projector.name)
        self.metadata: dict[str, dict[str, str]] = {f: {} for f in self.files}
        self.index = TensorIndex(self._info(m) for m in self._mapped.values())
        self._handles: dict[str, Any] = {}
        self._warned_f16 = False

    def _info(self, m: MappedTensor) -> TensorInfo:
        t = m.gguf
        nbytes, begin = t.nbytes, t.offset
        if m.join is not None:  # several stored tensors, joined in float32 when read
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
        m = self._mapped[name]
        t = m.gguf
        if m.join is not None:
            return m.join([_float32(name, part) for part in (t, *m.joined)])
        data = self._decode(name, _stored(name, m), self.index.info(name).shape)
        if m.interleaved_heads:
            data = rotate_half_rows(data, m.interleaved_heads, name)
        return data

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        info = self.index.info(name)
        if len(info.shape) != 2 or dim not in (0, 1) or not 0 <= start <= stop <= info.shape[dim]:
            raise TensorError(
                name, f"cannot read [{start}, {stop}) along dim {dim} of shape {list(info.shape)}"
            )
        m = self._mapped[name]
        if dim == 0 and m.join is None and not m.interleaved_heads:
            # Rows are stored independently (a block never spans two rows): read only these
            # (a tensor-parallel rank's slice of the embedding is dequantized alone).
            rows = _stored(name, m).reshape(info.shape[0], -1)[start:stop]
            return self._decode(name, rows, (stop - start, info.shape[1]))
        whole = self.read(name)
        return (whole[start:stop] if dim == 0 else whole[:, start:stop]).contiguous()

    def _decode(self, name: str, stored: Any, shape: tuple[int, ...]) -> Tensor:
        """Stored bytes (or values) -> the tensor `index` announces: raw blocks of a linear weight,
        a dequantized float32 table, or the float values."""
        m = self._mapped[name]
        try:
            data = torch.from_numpy(stored.copy())
        except Exception as exc:  # the mapping fails on I/O errors of the underlying file
            raise TensorError(name, f"cannot read data: {exc}", file=str(m.gguf.file)) from exc
        kind = m.gguf.ggml_type
        if kind == "BF16":
            data = data.view(torch.bfloat16)
        elif kind == "F16" and self.config.get("torch_dtype") == "bfloat16":
            self._check_bfloat16_exact(name, data)
        elif kind in BLOCK_TYPES and not m.linear:
            return _dequantize(kind, data.view(torch.uint8), shape)
        return data.reshape(shape)

    def _check_bfloat16_exact(self, name: str, data: Tensor) -> None:
        """`auto` runs F16 files in bfloat16 (gguf_layout.auto_dtype): say so, once per file,
        where an F16 value is not a bfloat16 value (it is then rounded, unless dtype=float32)."""
        if self._warned_f16:
            return
        inexact = _not_bfloat16(data)
        if inexact:
            self._warned_f16 = True
            log.warning(
                "%s: F16 tensor %s has %d values that bfloat16 (the default compute dtype for F16 "
                "files) rounds; pass dtype=float32 to run them exactly",
                self.path,
                name,
                inexact,
            )

    def close(self) -> None:
        self._handles.clear()


def _not_bfloat16(data: Tensor) -> int:
    """How many fp16 values bfloat16 cannot hold: bfloat16 keeps 8 significant bits and a wider
    exponent, so a normal fp16 value (11 bits) needs its low 3 mantissa bits zero, and a subnormal
    m * 2^-24 needs m's bits beyond the first 8 zero; infinities and NaNs carry over."""
    bits = data.reshape(-1).view(torch.int16)
    count = 0
    for start in range(0, bits.numel(), _DEQUANT_CHUNK):
        chunk = bits[start : start + _DEQUANT_CHUNK]
        exponent, mantissa = chunk & 0x7C00, chunk & 0x3FF
        normal = (exponent != 0) & (exponent != 0x7C00) & ((chunk & 7) != 0)
        subnormal = (exponent == 0) & (
            ((mantissa >= 512) & ((mantissa & 3) != 0)) | ((mantissa >= 256) & ((mantissa & 1) != 0))
        )
        count += int((normal | subnormal).sum())
    return count


def _stored(name: str, m: MappedTensor) -> Any:
    """The mapped numpy array of one tensor (one expert's slice of a stacked one)."""
    return m.gguf.data if m.expert is None else m.gguf.data[m.expert]


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
    """Blocks -> float32 through the canonical translation and the reference dequantization, a
    few thousand rows at a time (a 151,936-row embedding's intermediates would be ~2 GB at once)."""
    from anyquant.quant.reference import dequantize
    from anyquant.quant.weight import QuantWeight

    kind = BLOCK_TYPES[ggml_type]
    rows = _rows(shape)
    raw = raw.reshape(rows, -1)
    out = torch.empty(rows, shape[-1], dtype=torch.float32)
    step = max(1, _DEQUANT_CHUNK // max(1, shape[-1]))
    for start in range(0, rows, step):
        chunk = raw[start : start + step]
        codes, scale, offset = decode_rows(kind, chunk)
        weight = QuantWeight(kind.spec, (chunk.shape[0], shape[-1]), codes, scale, offset=offset)
        out[start : start + step] = dequantize(weight, torch.float32)
    return out.reshape(shape)
