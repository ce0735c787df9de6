"""`anyquant convert` between formats: every lossless pair round-trips A -> B -> A byte for byte,
and every conversion leaves each layer's dequantized weight bit-identical, decoded by each side's
own reader; compressed-tensors output is also decompressed by the compressed-tensors library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant.convert.converter import convert_checkpoint
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_model import write_tiny_model
from tests.convert._helpers import assert_same_checkpoint, dequantized_layers

# (source format, its options, target format). The source is written by `anyquant quantize`
# (checked elsewhere against the real tools), the target by the converter.
PAIRS = {
    "gptq-sym <-> ct-W4A16": ("gptq", WriteOptions(bits=4, group_size=32, sym=True), "compressed-tensors"),
    "gptq-sym <-> awq": ("gptq", WriteOptions(bits=4, group_size=32, sym=True), "awq"),
    "awq <-> gptq (asym v1)": ("awq", WriteOptions(bits=4, group_size=32), "gptq"),
    "awq <-> gptq-v2": ("awq", WriteOptions(bits=4, group_size=32), "gptq-v2"),
    "awq <-> ct-W4A16_ASYM": ("awq", WriteOptions(bits=4, group_size=32), "compressed-tensors"),
    "gptq-v2 <-> gptq": ("gptq-v2", WriteOptions(bits=4, group_size=32), "gptq"),
    "gptq-8bit <-> ct-W8A16": ("gptq", WriteOptions(bits=8, group_size=32, sym=True), "compressed-tensors"),
    "gptq-3bit <-> ct": ("gptq", WriteOptions(bits=3, group_size=32, sym=True), "compressed-tensors"),
    "fp8-block <-> ct-FP8_BLOCK": ("fp8-block", WriteOptions(block_size=(128, 128)), "compressed-tensors"),
    "fbgemm-fp8 <-> ct-FP8_DYNAMIC": ("fbgemm-fp8", WriteOptions(), "compressed-tensors"),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 128 wide so FP8_BLOCK's 128-input activation groups fit; bfloat16 so the scale dtype matters
    # (GPTQ/AWQ keep F16 scales, which bfloat16 cannot hold: the converter must pick float16).
    return write_tiny_model(
        tmp_path_factory.mktemp("dense") / "m", "llama", seed=3, hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, torch_dtype="bfloat16",
    )  # fmt: skip


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_round_trip_is_byte_identical_and_dequantizes_equal(dense: Path, tmp_path: Path, pair: str) -> None:
    fmt, options, target = PAIRS[pair]
    a, b, back = tmp_path / "a", tmp_path / "b", tmp_path / "back"
    quantize_checkpoint(dense, a, fmt, options)
    report = convert_checkpoint(a, b, target)
    assert {r.how for r in report.layers} <= {"exact", "unquantized"}
    assert any(r.how == "exact" for r in report.layers)
    convert_checkpoint(b, back, fmt)
    assert_same_checkpoint(a, back)
    # Each side decoded by its own reader: the same float64 weights, layer by layer.
    da, db = dequantized_layers(a), dequantized_layers(b)
    assert sorted(da) == sorted(db)
    for prefix in da:
        if da[prefix] is not None:
            assert torch.equal(da[prefix], db[prefix]), prefix


@pytest.mark.slow
def test_converted_compressed_tensors_runs_in_transformers_like_the_gptq_source(
    dense: Path, tmp_path: Path
) -> None:
    """An independent decoder: transformers + the compressed-tensors library load the converted
    file; their fp32 logits match ours on the GPTQ source (the same weights, other arithmetic)."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    from anyquant import LLM

    ids = [256, 5, 72, 101, 108, 108, 111, 44]
    src, ct = tmp_path / "gptq", tmp_path / "ct"
    quantize_checkpoint(dense, src, "gptq", WriteOptions(bits=4, group_size=32, sym=True))
    convert_checkpoint(src, ct, "compressed-tensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float()
    ours = LLM(src, dtype="float32", kernel="reference").logits(ids)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


@pytest.mark.needs_shared
@pytest.mark.parametrize(
    ("fixture", "target"),
    [
        ("llama-gptq-4bit-g128-sym-gptqmodel", "compressed-tensors"),
        ("llama-gptq-4bit-g128-sym-gptqmodel", "awq"),
        ("llama-awq-gemm-4bit-g128-autoawq", "gptq-v2"),
        ("llama-w4a16-g128-gptq-llmc", "gptq"),
    ],
)
def test_real_tool_checkpoints_convert_exactly(
    third_party: Path, tmp_path: Path, fixture: str, target: str
) -> None:
    """Files written by GPTQModel, AutoAWQ and llm-compressor convert with every layer exact."""
    src, dst = third_party / fixture, tmp_path / target
    report = convert_checkpoint(src, dst, target)
    assert {r.how for r in report.layers} <= {"exact", "unquantized"}
    da, db = dequantized_layers(src), dequantized_layers(dst)
    for prefix, weight in da.items():
        if weight is not None:
            assert torch.equal(weight, db[prefix]), prefix


def test_quantized_lm_head_round_trip(dense: Path, tmp_path: Path) -> None:
    a, b, back = tmp_path / "a", tmp_path / "b", tmp_path / "back"
    quantize_checkpoint(dense, a, "fp8-block", WriteOptions(block_size=(128, 128)), quantize_lm_head=True)
    report = convert_checkpoint(a, b, "compressed-tensors")
    assert {r.prefix: r.how for r in report.layers}["lm_head"] == "exact"
    convert_checkpoint(b, back, "fp8-block")
    assert_same_checkpoint(a, back)
