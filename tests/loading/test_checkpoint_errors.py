"""Bad checkpoints fail with an anyquant error that names the file or tensor and the expectation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant import LLM
from anyquant.errors import AnyquantError, CheckpointError, QuantConfigError, TensorError, UnsupportedError
from anyquant.loading.checkpoint import Checkpoint
from anyquant.utils.tiny_model import write_tiny_model


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny", "llama", seed=1)


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_truncated_safetensors(tiny: Path) -> None:
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(TensorError, match=r"model.safetensors.*truncated"):
        Checkpoint(tiny)


def test_truncated_header(tiny: Path) -> None:
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"model.safetensors: header claims \d+ bytes"):
        Checkpoint(tiny)


def test_corrupt_header_json(tiny: Path) -> None:
    f = tiny / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint(tiny)


def test_tiny_file(tiny: Path) -> None:
    (tiny / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short to be safetensors"):
        Checkpoint(tiny)


def test_missing_shard_in_index(tiny: Path) -> None:
    tensors = load_file(str(tiny / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(tiny / "model-00001-of-00002.safetensors"))
    (tiny / "model.safetensors").unlink()
    weight_map = {
        n: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
        for i, n in enumerate(names)
    }
    (tiny / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"shard 'model-00002-of-00002.safetensors' .* is missing"):
        Checkpoint(tiny)


def test_index_names_tensor_absent_from_shard(tiny: Path) -> None:
    tensors = load_file(str(tiny / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in tensors}
    weight_map["model.layers.9.mlp.up_proj.weight"] = "model.safetensors"
    (tiny / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(TensorError, match=r"model.layers.9.mlp.up_proj.weight.*not in that file"):
        Checkpoint(tiny)


def test_missing_tensor(tiny: Path) -> None:
    _rewrite(tiny, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(TensorError, match=r"model.layers.1.mlp.down_proj.weight.*missing"):
        LLM(tiny)


def test_missing_norm(tiny: Path) -> None:
    _rewrite(tiny, lambda t: t.pop("model.layers.0.input_layernorm.weight"))
    with pytest.raises(TensorError, match=r"model.layers.0.input_layernorm.weight.*missing"):
        LLM(tiny)


def test_wrong_shape(tiny: Path) -> None:
    _rewrite(tiny, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(TensorError, match=r"q_proj.weight.*shape \[64, 32\], expected \[64, 64\]"):
        LLM(tiny)


def test_wrong_dtype(tiny: Path) -> None:
    _rewrite(
        tiny,
        lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(160, 64, dtype=torch.int32)}),
    )
    with pytest.raises(TensorError, match=r"up_proj.weight.*dtype torch.int32"):
        LLM(tiny)


def test_unexpected_extra_tensor(tiny: Path) -> None:
    _rewrite(tiny, lambda t: t.update({"model.layers.5.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"not used by the model.*model.layers.5.mlp.up_proj.weight"):
        LLM(tiny)


def test_unknown_quant_method(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "magic4bit"}
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantConfigError, match=r"unknown quant_method 'magic4bit'; anyquant reads: .*gptq"):
        LLM(tiny)


def test_quantized_tensors_without_config(tiny: Path) -> None:
    _rewrite(
        tiny,
        lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(8, 160, dtype=torch.int32)}),
    )
    with pytest.raises(
        QuantConfigError,
        match=r"up_proj.qweight.*looks quantized.*no quantization_config|"
        r"up_proj.qweight.*looks quantized",
    ):
        LLM(tiny)


def test_unsupported_architecture(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedError, match=r"'GPT2LMHeadModel' is not supported; supported: .*LlamaForCausalLM"
    ):
        LLM(tiny)


def test_pickle_only_directory(tmp_path: Path, tiny: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"only pickle weights.*safetensors only"):
        Checkpoint(d)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        Checkpoint(tmp_path)


def test_empty_tensor_is_read_without_mapping(tiny: Path) -> None:
    _rewrite(tiny, lambda t: t.update({"extra.empty": torch.zeros(0, 16, dtype=torch.int32)}))
    ckpt = Checkpoint(tiny)
    assert not ckpt.index.has_data("extra.empty")
    assert ckpt.read("extra.empty").shape == (0, 16)


def test_cli_reports_error_without_traceback(tiny: Path) -> None:
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    proc = subprocess.run(
        [sys.executable, "-m", "anyquant", "inspect", str(tiny)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "anyquant inspect: error:" in proc.stderr and "truncated" in proc.stderr


def test_anyquant_errors_share_a_base() -> None:
    for cls in (CheckpointError, TensorError, QuantConfigError, UnsupportedError):
        assert issubclass(cls, AnyquantError)
