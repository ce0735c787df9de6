"""Which kind of checkpoint a path is: a transformers directory (safetensors) or a GGUF model."""

from __future__ import annotations

import os

from anyquant.errors import UnsupportedError
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.gguf_file import is_gguf_path


def open_checkpoint(path: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None = None) -> Checkpoint:
    """A GGUF file (a directory holding one, split parts) or a model directory with config.json.
    `mmproj`: llama.cpp's vision projector file for a GGUF language model."""
    if is_gguf_path(path):
        from anyquant.loading.gguf_checkpoint import GgufCheckpoint

        return GgufCheckpoint(path, mmproj)
    if mmproj is not None:
        raise UnsupportedError(
            f"{path}: --mmproj goes with a GGUF language model, not a transformers directory"
        )
    return Checkpoint(path)
