"""The files a transformers-style checkpoint needs beside its weights, when the source is GGUF.

A GGUF file carries its tokenizer and chat template in its metadata instead of tokenizer.json /
tokenizer_config.json: write those from the tokenizer the loader builds for a lone .gguf (one
builder, so a converted checkpoint tokenizes exactly as the .gguf does). config.json comes from
the checkpoint's own config, which the GGUF layout already derives from the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

from anyquant.loading.checkpoint import Checkpoint


def write_gguf_side_files(ckpt: Checkpoint, dst: Path) -> None:
    """tokenizer.json and tokenizer_config.json from a GGUF source's metadata; nothing otherwise."""
    from anyquant.loading.gguf_checkpoint import GgufCheckpoint

    if not isinstance(ckpt, GgufCheckpoint):
        return
    from anyquant.gguf_tokenizer import build_gguf_tokenizer

    built = build_gguf_tokenizer(ckpt.gguf.metadata, str(ckpt.path))
    built.tokenizer.save(str(dst / "tokenizer.json"))
    # transformers' fast tokenizer reads everything from tokenizer.json; the class name lets
    # AutoTokenizer pick it without a tokenizer.model.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **built.config}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
