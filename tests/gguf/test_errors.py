"""Bad GGUF input: errors name the file, the tensor or the metadata field, and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from anyquant import LLM
from anyquant.errors import AnyquantError, CheckpointError, TensorError, UnsupportedError
from anyquant.loading.gguf_checkpoint import GgufCheckpoint
from anyquant.loading.sources import open_checkpoint
from anyquant.tokenizer import Tokenizer
from tests.gguf.fixtures import write_pair


def test_truncated_data_names_the_file_and_tensor(tmp_path: Path) -> None:
    path, _ = write_pair(tmp_path, "qwen2", "Q4_0")
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(TensorError, match=r"blk\.1\.ffn_down\.weight.*" + path.name + ".*truncated"):
        open_checkpoint(path)


def test_truncated_header_names_the_file(tmp_path: Path) -> None:
    path, _ = write_pair(tmp_path, "qwen2", "Q4_0")
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=path.name + ".*not a readable GGUF"):
        open_checkpoint(path)


def test_not_gguf_at_all(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.gguf.*not a readable GGUF"):
        open_checkpoint(path)


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    path, _ = write_pair(tmp_path, "qwen2", "Q8_0", written_arch="mamba")
    with pytest.raises(UnsupportedError, match="'mamba' is not supported"):
        open_checkpoint(path)


def test_unknown_pre_tokenizer_is_named(tmp_path: Path) -> None:
    path, _ = write_pair(tmp_path, "qwen2", "Q8_0", pre="made-up-pre")
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, GgufCheckpoint)
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'made-up-pre'"):
        Tokenizer.from_gguf(ckpt.gguf.metadata, ckpt.path)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path: Path) -> None:
    path, _ = write_pair(tmp_path, "qwen2", "Q8_0")
    data = bytearray(path.read_bytes())
    # Retag output.weight as IQ2_XXS, a type anyquant does not read: patch the type field that
    # follows the tensor's name and dimensions in the header (the byte counts stay consistent
    # enough for the header to parse).
    name = b"output.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == 8  # Q8_0
    data[type_at : type_at + 4] = (16).to_bytes(4, "little")  # IQ2_XXS
    path.write_bytes(bytes(data))
    with pytest.raises(AnyquantError, match=r"output\.weight.*IQ2_XXS"):
        open_checkpoint(path)


def test_split_parts_load_like_one_file(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "split").mkdir()
    single, _ = write_pair(tmp_path / "one", "qwen2", "Q4_K")
    first, _ = write_pair(tmp_path / "split", "qwen2", "Q4_K", split_max_tensors=10)
    assert first.name == "qwen2-Q4_K-00001-of-00003.gguf"  # 23 tensors, 10 per part
    ids = [1, 2, 3, 100]
    want = LLM(str(single), dtype="float32").logits(ids)
    assert torch.equal(LLM(str(first), dtype="float32").logits(ids), want)
    assert torch.equal(LLM(str(first.parent), dtype="float32").logits(ids), want)  # the directory
    (first.parent / "qwen2-Q4_K-00002-of-00003.gguf").unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-00003\.gguf"):
        open_checkpoint(first)


def test_missing_file_is_reported_as_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.gguf: no such file"):
        open_checkpoint(tmp_path / "absent.gguf")
