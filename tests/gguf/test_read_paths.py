"""How GGUF tensors are read: a rank's rows of a table alone, tables dequantized a chunk at a
time, F16 files in bfloat16 by default with a warning where that rounds."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from anyquant import LLM
from anyquant.loading import gguf_checkpoint
from anyquant.loading.gguf_checkpoint import GgufCheckpoint, _not_bfloat16
from tests.gguf.fixtures import write_pair

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"


def test_not_bfloat16_counts_exactly_the_values_bfloat16_rounds() -> None:
    """Every one of the 65,536 fp16 bit patterns, against torch's own conversion round trip."""
    every = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    rounded = (every.to(torch.bfloat16).to(torch.float16) != every) & ~every.isnan()
    assert _not_bfloat16(every) == int(rounded.sum())
    assert _not_bfloat16(every[rounded]) == int(rounded.sum())
    assert _not_bfloat16(every[~rounded]) == 0


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K_M"])
def test_table_read_by_rows_and_in_chunks_equals_gguf_dequantize(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_checkpoint, "_DEQUANT_CHUNK", 1000)  # many chunks on a small table
    ckpt = GgufCheckpoint(FIXTURES / f"tiny-qwen2-{kind}.gguf")
    stored = ckpt.gguf.tensors["token_embd.weight"]
    reference = gguf.quants.dequantize(np.asarray(stored.data), gguf.GGMLQuantizationType[stored.ggml_type])
    whole = ckpt.read("model.embed_tokens.weight")
    assert torch.equal(whole, torch.from_numpy(np.ascontiguousarray(reference)))
    assert torch.equal(ckpt.read_slice("model.embed_tokens.weight", 0, 37, 301), whole[37:301])
    # A linear weight's raw blocks: the same rows of bytes.
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(ckpt.read_slice(name, 0, 5, 77), ckpt.read(name)[5:77])


def test_f16_file_runs_in_bfloat16_by_default_and_says_what_it_rounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, twin = write_pair(tmp_path, "qwen2", "F16")
    assert GgufCheckpoint(path).config["torch_dtype"] == "bfloat16"
    with caplog.at_level(logging.WARNING, logger="anyquant.loading.gguf_checkpoint"):
        llm = LLM(str(path))
    assert llm.dtype == torch.bfloat16
    assert any("F16 tensor" in r.message and "dtype=float32" in r.message for r in caplog.records)
    # float32 keeps the fp16 values exactly: the logits of their float32 copy.
    ids = [3, 17, 42, 99, 120]
    ours = LLM(str(path), dtype="float32").logits(ids)
    torch.testing.assert_close(ours, LLM(str(twin), dtype="float32").logits(ids), rtol=1e-5, atol=1e-5)


def test_f16_values_that_bfloat16_holds_load_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = write_pair(tmp_path, "qwen2", "F16")
    ckpt = GgufCheckpoint(path)
    name = "model.layers.0.mlp.up_proj.weight"
    exact = ckpt.read(name).to(torch.bfloat16).to(torch.float16)  # (this read warns: random values)
    fresh = GgufCheckpoint(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anyquant.loading.gguf_checkpoint"):
        fresh._check_bfloat16_exact(name, exact)
    assert not caplog.records
    fresh._check_bfloat16_exact(name, exact + torch.finfo(torch.float16).eps)
    assert len(caplog.records) == 1
