"""Which kind of checkpoint a path is: a transformers directory (safetensors) or a GGUF model."""

from __future__ import annotations

import os

from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.gguf_file import is_gguf_path


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A GGUF file (a directory holding one, split parts) or a model directory with config.json."""
    if is_gguf_path(path):
        from anyquant.loading.gguf_checkpoint import GgufCheckpoint

        return GgufCheckpoint(path)
    return Checkpoint(path)
