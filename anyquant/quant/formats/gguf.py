"""GGUF (llama.cpp) quantized linear weights as a `QuantFormat`.

A GGUF checkpoint (loading/gguf_checkpoint.py) presents every quantized linear weight as its raw
blocks, `prefix.weight` = uint8 [E?, N, bytes per row], and declares each one's GGML type in a
`gguf` quantization section. This format picks the canonical spec of that type and translates
the blocks exactly (gguf_blocks.py), so GGUF files take the same loading path, kernels, tensor
parallel planning and `inspect` as every other format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from anyquant.errors import QuantConfigError, TensorError
from anyquant.quant.formats.base import HeaderIndex, QuantFormat, StoredNames, require_dtype
from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES, BlockType, decode_rows
from anyquant.quant.registry import register_format
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight


@register_format("gguf")
class GgufFormat(QuantFormat):
    name = "gguf"

    def __init__(self, qconfig: dict[str, Any], index: HeaderIndex, source: str) -> None:
        super().__init__(qconfig, index, source)
        types = qconfig.get("tensor_types")
        if not isinstance(types, dict):
            raise QuantConfigError(f"{source}: 'tensor_types' must map tensor names to GGML types")
        unknown = {n: t for n, t in types.items() if t not in BLOCK_TYPES}
        if unknown:
            name, kind = next(iter(unknown.items()))
            raise QuantConfigError(
                f"{source}: tensor {name!r} has GGML type {kind!r}; quantized types read: {', '.join(BLOCK_TYPES)}"
            )
        self.types: dict[str, str] = dict(types)

    def block_type(self, prefix: str) -> BlockType | None:
        kind = self.types.get(f"{prefix}.weight")
        return None if kind is None else BLOCK_TYPES[kind]

    def spec_for(self, prefix: str, kind: LayerKind) -> QuantSpec | None:
        block = self.block_type(prefix)
        if block is None:
            return None
        return QuantSpec(
            block.spec.weight,
            "group",
            group_size=block.spec.group_size,
            has_offset=block.spec.has_offset,
            extra=(("gguf type", block.name),),
        )

    def stored_names(self, prefix: str, spec: QuantSpec) -> StoredNames:
        return StoredNames((f"{prefix}.weight",))

    def check_stored(
        self, prefix: str, spec: QuantSpec, stored: Mapping[str, Tensor], shape: tuple[int, int]
    ) -> None:
        name = f"{prefix}.weight"
        block = self.block_type(prefix)
        assert block is not None
        tensor = stored[name]
        require_dtype(name, tensor, torch.uint8)
        n, k = shape
        if k % block.block:
            raise TensorError(
                name, f"in_features {k} is not a multiple of {block.name}'s block of {block.block}"
            )
        want = (n, k // block.block * block.nbytes)
        if tuple(tensor.shape[-2:]) != want or tensor.dim() not in (2, 3):
            raise TensorError(
                name,
                f"{block.name} blocks have shape {list(tensor.shape)}, expected [E?, {want[0]}, {want[1]}] "
                f"for [out, in] = {list(shape)} from the GGUF metadata",
            )

    def decode(self, prefix: str, spec: QuantSpec, stored: dict[str, Tensor]) -> QuantWeight:
        name = f"{prefix}.weight"
        block = self.block_type(prefix)
        assert block is not None
        raw = stored[name]
        lead = tuple(raw.shape[:-2])
        n, row_bytes = raw.shape[-2:]
        k = row_bytes // block.nbytes * block.block
        codes, scale, offset = decode_rows(block, raw.reshape(-1, row_bytes))
        per_row = scale.shape[-1]
        return QuantWeight(
            spec,
            (int(n), int(k)),
            codes.reshape(*lead, n, k),
            scale.reshape(*lead, n, per_row),
            offset=None if offset is None else offset.reshape(*lead, n, per_row),
        )

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for kind in self.types.values():
            counts[kind] = counts.get(kind, 0) + 1
        return "gguf (" + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) + ")"
