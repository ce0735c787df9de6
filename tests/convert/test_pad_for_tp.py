"""`convert --pad-for-tp N`: intermediate sizes zero-padded so every rank holds whole groups and
tiles, the padded model computes the same fp32 logits (ours and transformers'), and a
Qwen2-72B-shaped checkpoint is planned from its headers alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from anyquant import LLM
from anyquant.convert.converter import ConvertOptions, checkpoint_padding, convert_checkpoint
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.loader import build_on_meta
from anyquant.loading.preflight import plan_tensor_parallel, spec_lookup
from anyquant.quant.detect import detect_format
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.spec import QuantSpec
from anyquant.utils.tiny_model import write_tiny_model
from tests.convert._helpers import config, dequantized_layers

IDS = [256, 5, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114]
INTER = 1344


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pad")
    dense = write_tiny_model(root / "dense", "llama", seed=11, intermediate_size=INTER)
    out = root / "w4a16"
    quantize_checkpoint(dense, out, "compressed-tensors", WriteOptions(scheme="W4A16", group_size=64))
    return out


def _mlp_splits(path: Path, world: int) -> list[tuple[int, int, list[int]]]:
    """(global size, per-rank size, per-rank padding) of every MLP split at `world` ranks."""
    ckpt = Checkpoint(path)
    model = build_on_meta(ckpt.text_config(), ckpt.index.names())
    plan = plan_tensor_parallel(model, spec_lookup(detect_format(ckpt)), world)
    return [
        (s.partition.size, s.partition.local_size, [s.partition.padding(r) for r in range(world)])
        for s in plan.splits
        if s.group.role == "channels"
    ]


@pytest.mark.parametrize("world", [2, 4])
def test_padded_checkpoint_splits_into_whole_groups_with_equal_logits(
    quantized: Path, tmp_path: Path, world: int
) -> None:
    dst = tmp_path / f"tp{world}"
    report = convert_checkpoint(quantized, dst, "compressed-tensors", ConvertOptions(pad_for_tp=world))
    padded = config(dst)["intermediate_size"]
    # 1344 = 21 groups of 64; shares are whole 128-feature tiles: 2 x 768 or 4 x 384.
    assert padded == 1536 and f"config.json intermediate_size: {INTER} -> 1536" in report.padding
    for size, local, pads in _mlp_splits(dst, world):
        assert size == padded and local * world == padded and local % 128 == 0 and local % 64 == 0
        assert pads == [0] * world  # the engine adds no padding of its own at this TP size
    # Padded gate/up rows and down columns dequantize to zero; the original part is unchanged.
    before, after = dequantized_layers(quantized), dequantized_layers(dst)
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        for proj in ("gate_proj", "up_proj"):
            assert torch.equal(after[f"{p}.{proj}"][:INTER], before[f"{p}.{proj}"])
            assert not after[f"{p}.{proj}"][INTER:].any()
        assert torch.equal(after[f"{p}.down_proj"][:, :INTER], before[f"{p}.down_proj"])
        assert not after[f"{p}.down_proj"][:, INTER:].any()
    ref = LLM(quantized, dtype="float32", kernel="reference").logits(IDS)
    got = LLM(dst, dtype="float32", kernel="reference").logits(IDS)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.slow
def test_padded_compressed_tensors_loads_in_transformers_with_equal_logits(
    quantized: Path, tmp_path: Path
) -> None:
    """transformers runs compressed-tensors checkpoints through the compressed-tensors library
    (installed here; GPTQ/AWQ need GPU-era libraries it cannot import on this CPU set-up)."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    dst = tmp_path / "padded"
    convert_checkpoint(quantized, dst, "compressed-tensors", ConvertOptions(pad_for_tp=2))
    logits = []
    for path in (quantized, dst):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert model.config.intermediate_size == (INTER if path == quantized else 1536)
        with torch.no_grad():
            logits.append(model(torch.tensor([IDS])).logits[0].float())
    assert torch.allclose(logits[1], logits[0], rtol=0, atol=1e-5 * float(logits[0].abs().max()))


def _header_only_checkpoint(path: Path, config: dict, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A real safetensors file whose data region is a hole (sparse): headers are exact, no bytes."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    size = {"I32": 4, "F16": 2, "BF16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def test_qwen2_72b_shape_planned_from_headers(tmp_path: Path) -> None:
    h, inter, g = 8192, 29568, 128
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                                "version": "gemm"},
    }  # fmt: skip
    tensors: dict[str, tuple[str, list[int]]] = {}

    def awq(prefix: str, n: int, k: int) -> None:
        tensors[f"{prefix}.qweight"] = ("I32", [k, n // 8])
        tensors[f"{prefix}.qzeros"] = ("I32", [k // g, n // 8])
        tensors[f"{prefix}.scales"] = ("F16", [k // g, n])

    p = "model.layers.0"
    for name, n, k in (("q_proj", h, h), ("k_proj", 1024, h), ("v_proj", 1024, h), ("o_proj", h, h)):
        awq(f"{p}.self_attn.{name}", n, k)
    for name in ("q_proj", "k_proj", "v_proj"):
        tensors[f"{p}.self_attn.{name}.bias"] = ("BF16", [h if name == "q_proj" else 1024])
    awq(f"{p}.mlp.gate_proj", inter, h)
    awq(f"{p}.mlp.up_proj", inter, h)
    awq(f"{p}.mlp.down_proj", h, inter)
    src = tmp_path / "qwen2-72b-awq-headers"
    _header_only_checkpoint(src, cfg, tensors)
    for world in (2, 4, 8):
        plan = checkpoint_padding(src, world)
        # The size Qwen2-VL-72B-AWQ was re-released with: 232 groups of 128, whole at TP 2, 4 and 8.
        assert plan.fields == {"intermediate_size": (inter, 29696)}
        (group,) = plan.groups
        assert group.padded // world % g == 0 and group.padded // world % 128 == 0
    # At TP 2 every rank then holds 14848 features = 116 whole groups, with no engine padding.
    padded_cfg = {**cfg, "intermediate_size": 29696}
    model = build_on_meta(padded_cfg, [])
    spec = QuantSpec("uint4", "group", group_size=g, has_zero=True)
    tp = plan_tensor_parallel(model, lambda layer: spec, 2)
    (mlp,) = [s for s in tp.splits if s.group.role == "channels"]
    assert mlp.partition.local_size == 14848 and mlp.partition.padding(0) == mlp.partition.padding(1) == 0


def test_moe_expert_and_shared_sizes_padded_with_equal_logits(tmp_path: Path) -> None:
    from anyquant.utils.tiny_moe import write_tiny_moe_model

    dense = write_tiny_moe_model(
        tmp_path / "dense", "qwen2_moe", seed=4, moe_intermediate_size=96,
        shared_expert_intermediate_size=160, intermediate_size=64,
    )  # fmt: skip
    src, dst = tmp_path / "gptq", tmp_path / "padded"
    quantize_checkpoint(dense, src, "gptq", WriteOptions(bits=4, group_size=32, sym=True))
    report = convert_checkpoint(src, dst, "gptq", ConvertOptions(pad_for_tp=2, tile=32))
    cfg = config(dst)
    # Per-rank shares of whole 32-feature tiles: 96 -> 2 x 64, 160 -> 2 x 96, 64 stays (2 x 32).
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["intermediate_size"]) == (
        128, 192, 64,
    )  # fmt: skip
    assert any("96 -> 128" in line for line in report.padding)
    for size, local, pads in _mlp_splits(dst, 2):
        assert local * 2 == size and local % 32 == 0 and pads == [0, 0]
    ref = LLM(src, dtype="float32", kernel="reference").logits(IDS)
    got = LLM(dst, dtype="float32", kernel="reference").logits(IDS)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
