"""GGUF files on disk: find the file (or split parts), parse them with the `gguf` package.

Owns which files make up a GGUF model (a file, a directory holding one, `-0000i-of-0000N.gguf`
parts), their metadata (key -> Python value, from the first part, where llama.cpp's split tool
puts it) and the table of stored tensors (GGML type, GGML shape, bytes, from whichever part).
Parsing is the `gguf` package's (the reader maintained with llama.cpp); this module adds the
checks that make a bad file an error naming the file and the tensor. It does not map names or
interpret metadata: gguf_layout.py does that.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyquant.errors import CheckpointError, TensorError, UnsupportedError

if TYPE_CHECKING:
    import numpy as np

# numpy (and gguf) are imported where a GGUF file is read: checking whether a path is one must
# not need them (a transformers checkpoint loads without the GGUF dependencies).
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GgufTensor:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    ggml_type: str  # GGMLQuantizationType name, e.g. "Q4_K"
    shape: tuple[int, ...]  # PyTorch order (GGML's ne reversed): [rows, row length]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int
    data: np.ndarray[Any, Any]  # memory-mapped: [rows, bytes per row] uint8 for block types, typed for floats


def is_gguf_path(path: str | os.PathLike[str]) -> bool:
    """A .gguf file, or a directory with a .gguf file and no config.json (a transformers directory
    that also holds a GGUF export loads as the transformers checkpoint)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return True  # a missing file is then reported as such, not as a missing directory
    return p.is_dir() and not (p / "config.json").exists() and any(_model_files(p))


def _model_files(directory: Path) -> list[Path]:
    # Vision projectors (mmproj) sit beside the language model in the same directory.
    return sorted(p for p in directory.glob("*.gguf") if not p.name.startswith("mmproj"))


def _model_stem(name: str) -> str:
    """The model a file belongs to: split parts share the name before `-0000i-of-0000N`."""
    match = _SPLIT.match(name)
    return match["stem"] if match else name


def gguf_parts(path: str | os.PathLike[str]) -> list[Path]:
    """The files of one GGUF model, first part first."""
    p = Path(path)
    if p.is_dir():
        files = _model_files(p)
        if not files:
            raise CheckpointError(f"{p}: no .gguf file in the directory")
        groups = {_model_stem(f.name) for f in files}
        if len(groups) > 1:
            names = ", ".join(f.name for f in files[:6])
            raise CheckpointError(f"{p}: holds several GGUF models ({names}); pass the file to load")
        p = files[0]
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    match = _SPLIT.match(p.name)
    if match is None:
        return [p]
    count = int(match["count"])
    parts = [p.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [q.name for q in parts if not q.is_file()]
    if missing:
        raise CheckpointError(f"{p}: split part(s) {', '.join(missing)} of {count} are missing")
    return parts


def _reader_class() -> type:
    try:
        import gguf
    except ImportError as exc:
        raise UnsupportedError(
            "reading GGUF files needs the gguf package (llama.cpp's reader): pip install 'anyquant[gguf]'"
        ) from exc

    class CheckedReader(gguf.GGUFReader):
        """gguf's reader with each tensor's type and byte range checked before it is mapped, so a
        truncated file or an unknown type names the tensor (the package's own error does not)."""

        def __init__(self, path: Path) -> None:
            self.path = str(path)
            super().__init__(path)

        # The package slices its np.memmap once per metadata value, and every slice of a memmap
        # subclass pays its bookkeeping: a 151,936-token vocabulary with its merges took ~40 s to
        # parse. The parser reads the same mapped bytes through a plain ndarray view (the mapping
        # stays open through the view's base) in a few seconds.
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, mapped: Any) -> None:
            import numpy as np

            self._plain = mapped.view(np.ndarray)

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            import numpy as np

            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_type, rel = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                try:
                    ggml_type = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise TensorError(
                        name, f"unknown GGML tensor type {int(raw_type[0])}", file=self.path
                    ) from None
                block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
                count = int(np.prod(dims, dtype=np.int64))
                if int(dims[0]) % block:
                    raise TensorError(
                        name,
                        f"row length {int(dims[0])} is not a multiple of {ggml_type.name}'s block of {block}",
                        file=self.path,
                    )
                end = start_offs + int(rel[0]) + count // block * type_size
                if end > size:
                    raise TensorError(
                        name,
                        f"data ends at byte {end} but the file has {size} bytes (truncated)",
                        file=self.path,
                    )
            super()._build_tensors(start_offs, fields)

    return CheckedReader


class GgufFile:
    """All parts of one GGUF model, parsed (metadata and tensor table; data stays mapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.parts = gguf_parts(path)
        self.path = self.parts[0]
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GgufTensor] = {}
        reader_cls = _reader_class()
        for i, part in enumerate(self.parts):
            reader = self._open(reader_cls, part)
            if reader.byte_order != "I":
                raise UnsupportedError(
                    f"{part}: a GGUF file of the other byte order (big-endian); anyquant reads little-endian files"
                )
            if i == 0:
                self.metadata = {
                    k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")
                }
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise TensorError(
                        t.name, f"stored twice (in {self.tensors[t.name].file.name} and {part.name})"
                    )
                self.tensors[t.name] = GgufTensor(
                    t.name,
                    t.tensor_type.name,
                    tuple(int(d) for d in reversed(t.shape.tolist())),
                    part,
                    int(t.data_offset),
                    int(t.n_bytes),
                    t.data,
                )
        expected = self.metadata.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(self.tensors):
            raise CheckpointError(
                f"{self.path}: split metadata announces {expected} tensors but the parts hold {len(self.tensors)}"
            )

    @staticmethod
    def _open(reader_cls: type, part: Path) -> Any:
        try:
            return reader_cls(part)
        except (TensorError, CheckpointError):
            raise
        except Exception as exc:  # the gguf package raises ValueError / IndexError / KeyError
            size = part.stat().st_size
            raise CheckpointError(
                f"{part}: not a readable GGUF file ({size} bytes; truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from exc

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def _field_value(field: Any) -> Any:
    """A metadata value as Python (str, int, float, bool, or a list of them)."""
    import numpy as np

    value = field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value
