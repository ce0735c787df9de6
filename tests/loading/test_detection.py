"""Where the quantization config lives, and what happens when config and tensors disagree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.errors import QuantConfigError
from anyquant.loading.checkpoint import TensorIndex, TensorInfo
from anyquant.loading.describe import describe_checkpoint
from anyquant.quant.detect import detect_format
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("dense"), "llama", seed=2, intermediate_size=128)


def _quantized(tiny_dense: Path, tmp_path: Path, fmt: str, **options: object) -> Path:
    dst = tmp_path / fmt
    quantize_checkpoint(tiny_dense, dst, fmt, WriteOptions(**options))  # type: ignore[arg-type]
    return dst


def _edit_config(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_nested_text_config(tiny_dense: Path, tmp_path: Path) -> None:
    q = _quantized(tiny_dense, tmp_path, "gptq", bits=4, group_size=32, sym=True)
    ref = LLM(q, dtype="float32").logits([1, 2, 3])

    def nest(cfg: dict) -> None:
        inner = {k: v for k, v in cfg.items() if k != "architectures"}
        cfg.clear()
        cfg.update({"architectures": ["LlamaForCausalLM"], "model_type": "llava", "text_config": inner})

    _edit_config(q, nest)
    (q / "quantize_config.json").unlink()
    doc = describe_checkpoint(q)
    assert doc["format"]["config_source"].endswith("config.json: text_config.quantization_config")
    assert torch.equal(LLM(q, dtype="float32").logits([1, 2, 3]), ref)


def test_side_file_only(tiny_dense: Path, tmp_path: Path) -> None:
    q = _quantized(tiny_dense, tmp_path, "gptq", bits=4, group_size=32, sym=True)
    _edit_config(q, lambda cfg: cfg.pop("quantization_config"))
    doc = describe_checkpoint(q)
    assert doc["format"]["name"] == "gptq"
    assert doc["format"]["config_source"].endswith("quantize_config.json")


def test_side_file_without_quant_method_is_gptq(tiny_dense: Path, tmp_path: Path) -> None:
    q = _quantized(tiny_dense, tmp_path, "gptq", bits=4, group_size=32, sym=True)
    _edit_config(q, lambda cfg: cfg.pop("quantization_config"))
    side = json.loads((q / "quantize_config.json").read_text())
    for key in ("quant_method", "method"):
        side.pop(key, None)
    (q / "quantize_config.json").write_text(json.dumps(side))
    assert describe_checkpoint(q)["format"]["name"] == "gptq"


def test_legacy_awq_quant_config_json(tiny_dense: Path, tmp_path: Path) -> None:
    q = _quantized(tiny_dense, tmp_path, "awq", bits=4, group_size=32)
    ref = LLM(q, dtype="float32").logits([5, 6])
    _edit_config(q, lambda cfg: cfg.pop("quantization_config"))
    (q / "quant_config.json").write_text(
        json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"})
    )
    doc = describe_checkpoint(q)
    assert doc["format"]["name"] == "awq" and doc["format"]["config_source"].endswith("quant_config.json")
    assert torch.equal(LLM(q, dtype="float32").logits([5, 6]), ref)


def test_skip_list_disagreeing_with_tensors_is_noted(third_party: Path, tmp_path: Path) -> None:
    src = third_party / "llama-awq-gemm-4bit-g128-autoawq"
    dst = tmp_path / "awq"
    shutil.copytree(src, dst)
    _edit_config(
        dst, lambda cfg: cfg["quantization_config"].update({"modules_to_not_convert": ["down_proj"]})
    )
    doc = describe_checkpoint(dst)
    assert doc["totals"]["quantized_layers"] == 14  # tensors win
    assert any("down_proj" in note for note in doc["notes"]), doc["notes"]


def test_empty_quantization_tensors_mean_unquantized(tiny_dense: Path, tmp_path: Path) -> None:
    """A layer with zero-element qweight/qzeros/scales and a plain weight (e.g. an unquantized vision
    tower written by a GPTQ tool) loads as unquantized; nothing reshapes an empty tensor."""
    from safetensors.torch import load_file, save_file

    q = _quantized(tiny_dense, tmp_path, "gptq", bits=4, group_size=32, sym=True)
    tensors = load_file(str(q / "model.safetensors"))
    dense = load_file(str(tiny_dense / "model.safetensors"))
    prefix = "model.layers.0.mlp.up_proj"
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        tensors[f"{prefix}.{suffix}"] = torch.zeros(0, dtype=tensors[f"{prefix}.{suffix}"].dtype)
    tensors[f"{prefix}.weight"] = dense[f"{prefix}.weight"]
    save_file(tensors, str(q / "model.safetensors"), metadata={"format": "pt"})
    doc = describe_checkpoint(q)
    assert prefix in doc["unquantized_layers"]
    logits = LLM(q, dtype="float32").logits([1, 2, 3])
    assert torch.isfinite(logits).all()


class _Headers:
    """A checkpoint as detection sees it (`QuantizedCheckpoint`): headers and no quantization section."""

    def __init__(self, tensors: dict[str, str]) -> None:
        self.path = Path("undeclared")
        self.index = TensorIndex(
            TensorInfo(n, "model.safetensors", d, (4, 4), (0, 0)) for n, d in tensors.items()
        )

    def quant_config(self) -> None:
        return None


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        # every format's marker tensors (each format declares its own `marker_suffixes`) ...
        ("model.layers.0.mlp.up_proj.qweight", "I32"),  # gptq, awq
        ("model.layers.0.mlp.up_proj.qzeros", "I32"),
        ("model.layers.0.mlp.up_proj.weight_packed", "I32"),  # compressed-tensors
        ("model.layers.0.mlp.up_proj.weight_scale", "F32"),  # compressed-tensors, fp8, fbgemm_fp8
        ("model.layers.0.mlp.up_proj.weight_scale_inv", "F32"),  # fp8 blocks
        # ... and weights in a weight type's unpacked dtype
        ("model.layers.0.mlp.up_proj.weight", "I8"),
        ("model.layers.0.mlp.up_proj.weight", "F8_E4M3"),
        ("model.layers.0.mlp.up_proj.weight", "F8_E5M2"),
    ],
)
def test_quantized_tensors_without_a_declaration_are_refused(name: str, dtype: str) -> None:
    with pytest.raises(QuantConfigError, match=rf"tensor '{name}' \({dtype} \[4, 4\]\) looks quantized"):
        detect_format(_Headers({"model.embed_tokens.weight": "BF16", name: dtype}))


def test_a_plain_checkpoint_is_unquantized() -> None:
    plain = {"model.layers.0.mlp.up_proj.weight": "BF16", "model.layers.0.mlp.up_proj.bias": "F32"}
    assert detect_format(_Headers(plain)) is None
