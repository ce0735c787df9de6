"""Quantize an unquantized checkpoint into a target format, layer by layer.

Owns the streaming rewrite: each linear weight is read, quantized (round-to-nearest), encoded by
the target format's writer and written; everything else is copied unchanged. Memory stays at
about one layer (output tensors go to disk as they are added, `ShardWriter`): the input's memory
maps are dropped every `_MAPPED_BYTES` read, and the reported error is computed a block of rows
at a time. What the save step imports is checked before any work starts. Used by `anyquant
quantize` and by test fixtures.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import AnyquantError, CheckpointError
from anyquant.loading.checkpoint import TORCH_TO_SAFETENSORS, Checkpoint
from anyquant.loading.loader import build_on_meta
from anyquant.loading.plan import linear_layers
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.detect import detect_format
from anyquant.quant.formats.base import FormatWriter, WriteOptions
from anyquant.quant.quant_error import relative_error
from anyquant.quant.registry import writer_class
from anyquant.quant.spec import ROUTER_UNQUANTIZED
from anyquant.utils.memory import return_freed_memory

log = logging.getLogger(__name__)

_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",  # image preprocessing of vision-language models
    "vocab.json",
    "merges.txt",
)
_SHARD_BYTES = 2 << 30
# Input read through memory maps stays resident (counted in RSS) while the map is open; dropping
# the maps this often bounds it. Reopening a file only re-reads its header.
_MAPPED_BYTES = 128 << 20
# Modules the save step imports: safetensors writes through numpy (safetensors.torch.save_file).
_SAVE_MODULES = {"safetensors.torch": "safetensors", "numpy": "numpy"}


def require_save_modules() -> None:
    """Fail in a second, not after quantizing for minutes, when the save step cannot import."""
    import importlib

    missing = []
    for module, package in _SAVE_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise AnyquantError(
            f"writing safetensors files needs the Python package(s) {', '.join(missing)}, which cannot be "
            f"imported; install with: pip install {' '.join(missing)}"
        )


@dataclass
class LayerReport:
    prefix: str
    spec: str  # description, or "skipped: <reason>"
    rel_error: float | None  # ||W - deq(Q(W))|| / ||W||


@dataclass
class QuantizeReport:
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


class ShardWriter:
    """Streams output tensors into safetensors shards of about `_SHARD_BYTES`.

    Each tensor's bytes go to a shard's temporary data file as soon as it is added, so nothing
    written is held in memory (a buffered shard, serialized at the end, cost up to twice the shard
    in RSS). The header, which needs every shape, is written when the shard closes, and the data
    copied after it in chunks."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.names: list[list[str]] = []  # per finished shard
        self._tmp: list[Path] = []
        self._seen: set[str] = set()
        self._entries: dict[str, dict[str, Any]] = {}
        self._data: Any = None  # the open data file of the current shard
        self._offset = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._seen:
            raise CheckpointError(f"output tensor {name!r} written twice")
        self._seen.add(name)
        if self._data is None:
            self._data = open(self.dst / f".shard-{len(self._tmp)}.data", "wb")  # noqa: SIM115
        flat = tensor.detach().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        if nbytes:
            self._data.write(flat.view(torch.uint8).numpy().tobytes())  # one tensor's bytes at a time
        dtype = TORCH_TO_SAFETENSORS.get(tensor.dtype)
        if dtype is None:
            raise CheckpointError(f"output tensor {name!r}: safetensors cannot store {tensor.dtype}")
        self._entries[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes
        if self._offset >= _SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._data is None:
            return
        data_path = Path(self._data.name)
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":"))
        raw = header.encode() + b" " * (-len(header.encode()) % 8)  # data starts 8-byte aligned
        path = self.dst / f".shard-{len(self._tmp)}.tmp"
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(data, out, 16 << 20)
        data_path.unlink()
        self._tmp.append(path)
        self.names.append(list(self._entries))
        self._entries, self._data, self._offset = {}, None, 0

    def finish(self) -> list[str]:
        self._flush()
        if len(self._tmp) == 1:
            final = ["model.safetensors"]
        else:
            final = [f"model-{i + 1:05d}-of-{len(self._tmp):05d}.safetensors" for i in range(len(self._tmp))]
        for tmp, name in zip(self._tmp, final):
            tmp.replace(self.dst / name)
        if len(final) > 1:
            weight_map = {t: final[i] for i, names in enumerate(self.names) for t in names}
            (self.dst / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
            )
        return final


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    fmt: str,
    options: WriteOptions,
    skip: list[str] | None = None,
    quantize_lm_head: bool = False,
    overwrite: bool = False,
) -> QuantizeReport:
    require_save_modules()
    src_path, dst_path = Path(src), Path(dst)
    ckpt = Checkpoint(src_path)
    if detect_format(ckpt) is not None:
        raise AnyquantError(
            f"{src_path} is already quantized; quantize starts from an unquantized checkpoint"
        )
    writer: FormatWriter = writer_class(fmt)(options)
    if dst_path.exists() and any(dst_path.iterdir()):
        if not overwrite:
            raise AnyquantError(f"{dst_path} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(dst_path)
    dst_path.mkdir(parents=True, exist_ok=True)
    config = ckpt.text_config()
    model = build_on_meta(config, ckpt.index.names())
    skip_res = [re.compile(p) for p in (skip or [])]
    candidates = {
        layer.prefix: layer for layer in linear_layers(model) if layer.kind != "lm_head" or quantize_lm_head
    }
    report = QuantizeReport()
    out = ShardWriter(dst_path)
    mapped = 0
    for name in ckpt.index:
        info = ckpt.index.info(name)
        mapped += info.numel * info.torch_dtype.itemsize
        if mapped > _MAPPED_BYTES:
            ckpt.close()  # unmap what was read so far (nothing buffered is a view into it)
            mapped = 0
        prefix = name.removesuffix(".weight")
        layer = candidates.get(prefix) if name.endswith(".weight") else None
        if layer is None:
            # A read is a view into the input's memory map: a copy lets the map be dropped.
            out.add(name, ckpt.read(name).clone())
            continue
        dense = ckpt.read(name)
        reason: str | None = None
        if layer.kind == "router":
            reason = ROUTER_UNQUANTIZED
        elif any(r.search(prefix) for r in skip_res):
            reason = "matches --skip"
        elif dense.dim() != 2:
            reason = (
                f"stored as a {dense.dim()}-D tensor {list(dense.shape)}; writers store [out, in] Linears"
            )
        else:
            # The kind is the layer's role: an expert's projection is written like any Linear.
            spec = writer.spec_for(prefix, layer.shape, layer.kind)
            if isinstance(spec, str):
                reason = spec
        if reason is not None:
            report.skipped.append(prefix)
            report.layers.append(LayerReport(prefix, f"skipped: {reason}", None))
            out.add(name, dense.clone())
            continue
        assert not isinstance(spec, str)
        weight = quantize_rtn(dense, spec, writer.scale_dtype(dense.dtype))
        if spec.act is not None and not spec.act.dynamic:
            scale = writer.input_scale(prefix)
            if scale is None:
                raise AnyquantError(
                    f"{prefix}: static activation scheme needs calibration amax "
                    "(options.extra['act_amax']); use a dynamic scheme instead"
                )
            weight.input_scale = scale.float()
        weight.validate(prefix)
        report.layers.append(LayerReport(prefix, spec.describe(), relative_error(dense, weight)))
        for tname, tensor in writer.encode(prefix, weight).items():
            out.add(tname, tensor)
        del dense, weight
        # The last layer's temporaries: 0.6-1.6 GB peak RSS on a 480 MB input without this, 0.5 GB with.
        return_freed_memory()
    ckpt.close()
    report.files = out.finish()
    write_configs(ckpt, dst_path, writer, report.skipped)
    log.info(
        "quantized %s -> %s (%s): %d layers, %d skipped",
        src_path,
        dst_path,
        fmt,
        len(report.layers) - len(report.skipped),
        len(report.skipped),
    )
    return report


def write_configs(
    ckpt: Checkpoint,
    dst: Path,
    writer: FormatWriter,
    skipped: list[str],
    config: dict[str, Any] | None = None,
) -> None:
    """config.json (the source's, or `config`, with the writer's quantization_config), the
    writer's side files and the tokenizer files."""
    config = dict(ckpt.config if config is None else config)
    config["quantization_config"] = writer.quantization_config(skipped)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, content in writer.side_files(skipped).items():
        (dst / name).write_text(json.dumps(content, indent=2) + "\n")
    for name in _COPIED_FILES:
        if (ckpt.path / name).is_file():
            shutil.copy2(ckpt.path / name, dst / name)
    extra_templates = ckpt.path / "additional_chat_templates"  # transformers 5's named templates
    if extra_templates.is_dir():
        shutil.copytree(extra_templates, dst / extra_templates.name, dirs_exist_ok=True)
