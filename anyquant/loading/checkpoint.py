"""A model directory on disk: config.json, safetensors headers, lazy tensor reads.

Owns finding and validating files (index, shards, headers), locating the quantization config
wherever a tool put it, and reading single tensors on demand. It does not interpret tensors:
formats do that. Everything here except `read` touches headers only, so `inspect` is cheap.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.config_fields import read_json_object
from anyquant.errors import CheckpointError, TensorError

# safetensors dtype names -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
}
TORCH_TO_SAFETENSORS = {dt: name for name, (dt, _) in SAFETENSORS_DTYPES.items()}

# Where tools put the quantization section inside config.json (multimodal models nest the LLM).
_NESTED_CONFIG_KEYS = ("text_config", "llm_config", "language_config", "thinker_config")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # file name inside the model directory
    dtype: str  # safetensors dtype name, e.g. "I32"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the file's data section

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype][0]


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate one safetensors header: (tensors, metadata, data start offset).

    Catches truncated and corrupt files up front, naming the file and the offending tensor. The
    checks are those of the safetensors format (and library, which reads the data later): a file
    passing them here can be read; one failing them would only fail later, mid-load.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short to be safetensors (truncated?)"
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: header claims {header_len} bytes but the file has {size} (truncated or not safetensors)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    header = _parse_header_json(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: corrupt safetensors header ('__metadata__' must map strings to strings, got {metadata!r:.200})"
        )
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in header.items()}
    _check_data_layout(path, tensors, data_size)
    return tensors, dict(metadata), data_start


def _parse_header_json(path: Path, raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{path}: corrupt safetensors header (name {key!r} appears twice)")
            seen[key] = value
        return seen

    try:
        # The format pads headers with spaces only (JSON whitespace); nothing else may follow.
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object)")
    return header


def _is_count(value: Any) -> bool:
    """A JSON non-negative integer (not a bool, not a float like 2.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    def bad(problem: str) -> TensorError:
        return TensorError(name, problem, file=str(path))

    if not isinstance(entry, dict):
        raise bad(f"header entry is {entry!r:.100}; expected an object with dtype, shape, data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise bad(f"header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {dtype!r:.100}; expected one of {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r:.100} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r:.100} is not [begin, end] (two non-negative integers)")
    begin, end = offsets
    info = TensorInfo(name, path.name, dtype, tuple(shape), (begin, end))
    if end - begin != info.numel * SAFETENSORS_DTYPES[dtype][1]:
        raise bad(f"byte range {begin}..{end} does not hold {list(shape)} {dtype}")
    if end > data_size:
        raise bad(f"data ends at byte {end} but the file holds only {data_size} data bytes (truncated)")
    return info


def _check_data_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """The tensors' byte ranges tile the data section exactly: no overlap, gap or trailing bytes."""
    covered = 0
    for info in sorted(tensors.values(), key=lambda t: t.offsets):
        begin, end = info.offsets
        if begin != covered:
            problem = (
                "overlaps the tensor before it"
                if begin < covered
                else f"leaves bytes {covered}..{begin} unused"
            )
            raise TensorError(
                info.name, f"byte range {begin}..{end} {problem} (corrupt header)", file=str(path)
            )
        covered = end
    if covered != data_size:
        raise CheckpointError(
            f"{path}: the tensors cover {covered} data bytes but the file holds {data_size} "
            "(trailing bytes: corrupt or not safetensors)"
        )


def _is_shard_name(value: Any) -> bool:
    """A plain *.safetensors file name: shards live in the model directory, never elsewhere."""
    return (
        isinstance(value, str) and value.endswith(".safetensors") and "/" not in value and "\\" not in value
    )


class TensorIndex:
    """Names, dtypes and shapes of every tensor of a checkpoint, from headers only."""

    def __init__(self, tensors: Iterable[TensorInfo]) -> None:
        self._tensors = {t.name: t for t in tensors}

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def get(self, name: str) -> TensorInfo | None:
        return self._tensors.get(name)

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise TensorError(name, "missing from the checkpoint")
        return self._tensors[name]

    def has_data(self, name: str) -> bool:
        """Present with at least one element (zero-size quantization tensors mean 'not quantized')."""
        info = self._tensors.get(name)
        return info is not None and info.numel > 0

    def names(self) -> list[str]:
        return list(self._tensors)


@dataclass(frozen=True)
class QuantConfigSource:
    config: dict[str, Any]
    where: str  # e.g. "config.json: quantization_config", "quantize_config.json"


class Checkpoint:
    """A model directory. Construction reads config.json and all safetensors headers."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"{self.path}: not a directory (expected a model directory with config.json)"
            )
        self.config = self._read_json("config.json", required=True)
        self.files = self._weight_files()
        infos: list[TensorInfo] = []
        self.metadata: dict[str, dict[str, str]] = {}
        self._data_start: dict[str, int] = {}
        for file in self.files:
            tensors, meta, start = read_safetensors_header(self.path / file)
            infos.extend(tensors.values())
            self.metadata[file] = meta
            self._data_start[file] = start
        self.index = TensorIndex(infos)
        self._check_index_map()
        self._handles: dict[str, Any] = {}

    # -- files -------------------------------------------------------------------------------
    def _read_json(self, name: str, required: bool = False) -> dict[str, Any]:
        path = self.path / name
        if not path.exists():
            if required:
                raise CheckpointError(f"{path}: missing (every model directory needs a config.json)")
            return {}
        return read_json_object(path)

    def _weight_files(self) -> list[str]:
        index = self._read_json("model.safetensors.index.json")
        if index:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{self.path / 'model.safetensors.index.json'}: no 'weight_map' object")
            bad = next((v for v in weight_map.values() if not _is_shard_name(v)), None)
            if bad is not None:
                raise CheckpointError(
                    f"{self.path / 'model.safetensors.index.json'}: weight_map names shard {bad!r:.80}; "
                    "expected a *.safetensors file name inside the model directory"
                )
            self._weight_map: dict[str, str] = dict(weight_map)
            files = sorted(set(self._weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                lost = [t for t, f in self._weight_map.items() if f == missing[0]]
                raise CheckpointError(
                    f"{self.path}: shard {missing[0]!r} listed in model.safetensors.index.json is missing "
                    f"({len(lost)} tensors, e.g. {lost[0]!r}); {len(missing)} of {len(files)} shards missing"
                )
            return files
        self._weight_map = {}
        # Without an index, `model.safetensors` is the model (other *.safetensors beside it may be
        # adapters or reference data); otherwise take every file (AutoGPTQ names its single file
        # gptq_model-4bit-128g.safetensors).
        if (self.path / "model.safetensors").is_file():
            return ["model.safetensors"]
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            if pickles:
                raise CheckpointError(
                    f"{self.path}: only pickle weights ({', '.join(pickles[:3])}); anyquant loads safetensors only "
                    "(pickles can run arbitrary code). Convert them with transformers' save_pretrained first."
                )
            raise CheckpointError(f"{self.path}: no *.safetensors weight files")
        return files

    def _check_index_map(self) -> None:
        for name, file in self._weight_map.items():
            info = self.index.get(name)
            if info is None:
                raise TensorError(
                    name, f"listed in model.safetensors.index.json under {file!r} but not in that file"
                )
            if info.file != file:
                raise TensorError(name, f"index says {file!r} but the tensor is in {info.file!r}")

    # -- config ------------------------------------------------------------------------------
    def read_side_json(self, name: str) -> dict[str, Any]:
        return self._read_json(name)

    def quant_config(self) -> QuantConfigSource | None:
        """The quantization section, wherever the producing tool wrote it (formats.md §1.1)."""
        qc = self.config.get("quantization_config")
        if isinstance(qc, dict) and qc:
            return QuantConfigSource(qc, "config.json: quantization_config")
        for key in _NESTED_CONFIG_KEYS:
            sub = self.config.get(key)
            if isinstance(sub, dict) and isinstance(sub.get("quantization_config"), dict):
                return QuantConfigSource(
                    sub["quantization_config"], f"config.json: {key}.quantization_config"
                )
        for side in ("quantize_config.json", "quant_config.json"):
            qc = self._read_json(side)
            if qc:
                return QuantConfigSource(qc, side)
        return None

    def text_config(self) -> dict[str, Any]:
        """The language-model part of config.json (nested for multimodal checkpoints)."""
        for key in _NESTED_CONFIG_KEYS:
            sub = self.config.get(key)
            if isinstance(sub, dict) and "hidden_size" in sub:
                # The top-level fields come along where the language model's config lacks them:
                # multimodal families need vision_config and the image token ids.
                outer = {k: v for k, v in self.config.items() if k not in _NESTED_CONFIG_KEYS}
                return {
                    **outer,
                    **sub,
                    "architectures": self.config.get("architectures", sub.get("architectures")),
                }
        return self.config

    # -- data --------------------------------------------------------------------------------
    def _handle(self, info: TensorInfo) -> Any:
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self.path / info.file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path / info.file}: cannot open: {exc}") from exc
            self._handles[info.file] = handle
        return handle

    def read(self, name: str) -> Tensor:
        """Read one tensor into CPU memory (copy; the file may be closed afterwards)."""
        info = self.index.info(name)
        if info.numel == 0:
            # Empty tensors have no bytes to map; build them directly (formats.md §11.9).
            return torch.empty(info.shape, dtype=info.torch_dtype)
        handle = self._handle(info)
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise TensorError(name, f"cannot read data: {exc}", file=info.file) from exc

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        """Entries [start, stop) of a 2-D tensor along `dim`, reading only those bytes (a
        tensor-parallel rank's rows or columns of a dense weight)."""
        info = self.index.info(name)
        if len(info.shape) != 2 or dim not in (0, 1) or not 0 <= start <= stop <= info.shape[dim]:
            raise TensorError(
                name, f"cannot read [{start}, {stop}) along dim {dim} of shape {list(info.shape)}"
            )
        if info.numel == 0 or start == stop:
            shape = list(info.shape)
            shape[dim] = stop - start
            return torch.empty(shape, dtype=info.torch_dtype)
        handle = self._handle(info)
        try:
            part = handle.get_slice(name)
            return part[start:stop] if dim == 0 else part[:, start:stop]
        except Exception as exc:
            raise TensorError(name, f"cannot read data: {exc}", file=info.file) from exc

    def read_many(self, names: Iterable[str]) -> dict[str, Tensor]:
        return {n: self.read(n) for n in names}

    def close(self) -> None:
        self._handles.clear()
