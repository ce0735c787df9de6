"""`anyquant convert ... --format gguf`: GGUF -> GPTQ / compressed-tensors -> GGUF gives back
llama.cpp's Q4_0 / Q8_0 blocks byte for byte (read with gguf-py, the independent reader), for
llama.cpp's own Qwen2 fixtures and a Llama file (whose q/k rows llama.cpp interleaves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anyquant import LLM
from anyquant.convert.converter import ConversionRefused, ConvertOptions, convert_checkpoint
from anyquant.convert.gguf_target import convert_to_gguf
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.errors import UnsupportedError
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_model import write_tiny_model

from ..gguf.fixtures import write_pair
from ._helpers import dequantized_layers

gguf = pytest.importorskip("gguf")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]


def _tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _round_trip(src: Path, middle: str, tmp_path: Path) -> Path:
    convert_checkpoint(src, tmp_path / "mid", middle)
    out = tmp_path / "back.gguf"
    report = convert_to_gguf(tmp_path / "mid", out)
    assert all(r.how == "exact" for r in report.layers), report.layers
    return out


def _assert_blocks_identical(src: Path, out: Path) -> None:
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for name, x in a.items():
        y = b[name]
        xd, yd = np.asarray(x.data), np.asarray(y.data)  # type: ignore[attr-defined]
        if x.tensor_type == y.tensor_type:  # type: ignore[attr-defined]
            assert np.array_equal(xd.view(np.uint8), yd.view(np.uint8)), name  # the same bytes
        else:
            # Tensors the middle format keeps in float (the embedding, a Q6_K LM head) come back
            # F32, holding the same values.
            assert y.tensor_type == gguf.GGMLQuantizationType.F32, name  # type: ignore[attr-defined]
            want = gguf.quants.dequantize(xd, x.tensor_type)  # type: ignore[attr-defined]
            assert np.array_equal(want, yd), name


@pytest.mark.parametrize(("kind", "middle"), [("Q4_0", "gptq"), ("Q8_0", "compressed-tensors")])
def test_gguf_round_trip_is_bit_identical(kind: str, middle: str, tmp_path: Path) -> None:
    src = FIXTURES / f"tiny-qwen2-{kind}.gguf"
    out = _round_trip(src, middle, tmp_path)
    _assert_blocks_identical(src, out)
    linear = [n for n, t in _tensors(src).items() if "blk" in n and t.tensor_type.name == kind]  # type: ignore[attr-defined]
    assert len(linear) == 7
    meta = gguf.GGUFReader(str(out)).fields
    assert meta["general.architecture"].contents() == "qwen2"
    assert meta["qwen2.block_count"].contents() == 1
    assert meta["tokenizer.ggml.pre"].contents() == "qwen2"
    # anyquant runs the written file like the original (same weights, same tokenizer).
    original, written = LLM(str(src), dtype="float32"), LLM(str(out), dtype="float32")
    assert (original.logits(PROMPT) - written.logits(PROMPT)).abs().max() == 0
    assert original.tokenizer is not None and written.tokenizer is not None
    text = "Hello, world! 123\n"
    assert original.tokenizer.encode(text) == written.tokenizer.encode(text)


def test_llama_q_k_rows_go_back_to_llamacpp_order(tmp_path: Path) -> None:
    src, _ = write_pair(tmp_path, "llama", "Q4_0", pre="llama-bpe")
    out = _round_trip(src, "gptq", tmp_path)
    a, b = _tensors(src), _tensors(out)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"):
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name  # type: ignore[attr-defined]
    # The tokenizer went through tokenizer.json and back: same pre-tokenizer name, same tokens.
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    original, written = LLM(str(src)).tokenizer, LLM(str(out)).tokenizer
    assert original is not None and written is not None
    text = "Hello, world! 12345 it's\n"
    assert original.encode(text) == written.encode(text)


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_0", "Q5_1"])
def test_gguf_to_gguf_keeps_llamacpp_blocks(kind: str, tmp_path: Path) -> None:
    """llama.cpp's own Q4_1 / Q5_0 / Q5_1 layers come back as the same blocks (a layer may also
    land in a smaller type that holds it exactly: then its values are GGML's, bit for bit)."""
    src = FIXTURES / f"tiny-qwen2-{kind}.gguf"
    out = tmp_path / "back.gguf"
    report = convert_to_gguf(src, out)
    how = {r.prefix: r.how for r in report.layers}
    assert how.pop("lm_head") == "dequantized"  # llama-quantize's Q6_K head: written as F32
    assert set(how.values()) == {"exact"}, report.layers
    a, b = _tensors(src), _tensors(out)
    same = 0
    for name, x in a.items():
        if "blk" not in name or x.tensor_type.name != kind:  # type: ignore[attr-defined]
            continue
        y = b[name]
        xd, yd = np.asarray(x.data), np.asarray(y.data)  # type: ignore[attr-defined]
        if y.tensor_type == x.tensor_type:  # type: ignore[attr-defined]
            assert np.array_equal(xd, yd), name
            same += 1
        want = gguf.quants.dequantize(xd, x.tensor_type)  # type: ignore[attr-defined]
        got = gguf.quants.dequantize(yd, y.tensor_type)  # type: ignore[attr-defined]
        assert np.array_equal(want.view(np.uint32), got.view(np.uint32)), name
    assert same >= 1
    ids = PROMPT
    assert (
        LLM(str(src), dtype="float32").logits(ids) - LLM(str(out), dtype="float32").logits(ids)
    ).abs().max() == 0


def test_asymmetric_4bit_groups_of_128_fit_a_5bit_type_exactly(tmp_path: Path) -> None:
    """Zero points outside Q4_0's fixed 8: levels code - zero span 16 values within [-15, 15],
    which Q5_0's symmetric 5-bit levels hold (or Q4_1 where the minimum -zero * scale is an fp16
    value); no 8-bit Q8_0 needed. 128-groups split into 32-blocks."""
    dense = write_tiny_model(
        tmp_path / "dense", "llama", seed=5, hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    mid = tmp_path / "mid"
    quantize_checkpoint(dense, mid, "gptq", WriteOptions(bits=4, group_size=128, sym=False))
    report = convert_to_gguf(mid, tmp_path / "x.gguf")
    assert {r.target for r in report.layers} <= {"Q4_1", "Q5_0"}
    assert all(r.how == "exact" for r in report.layers)
    written = _tensors(tmp_path / "x.gguf")
    want_all = dequantized_layers(mid)
    for prefix, gguf_name in (("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"),
                              ("model.layers.1.mlp.gate_proj", "blk.1.ffn_gate.weight")):  # fmt: skip
        t = written[gguf_name]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # type: ignore[attr-defined]
        want = want_all[prefix]
        assert want is not None and np.array_equal(got.astype(np.float64), want.numpy()), prefix
    with pytest.raises(UnsupportedError, match="pad-for-tp"):
        convert_to_gguf(mid, tmp_path / "y.gguf", ConvertOptions(pad_for_tp=2))


def test_float_offsets_are_refused_per_layer_or_requantized(tmp_path: Path) -> None:
    src = FIXTURES / "tiny-qwen2-Q4_K_M.gguf"
    with pytest.raises(ConversionRefused) as info:
        convert_to_gguf(src, tmp_path / "x.gguf")
    refused = {r.prefix: r.reason or "" for r in info.value.refused}
    assert "float offset per group" in refused["model.layers.0.mlp.gate_proj"]
    assert "scales differ within one group of 32" in refused["model.layers.0.mlp.down_proj"]  # Q6_K
    assert not (tmp_path / "x.gguf").exists()

    out = tmp_path / "z.gguf"
    report = convert_to_gguf(src, out, ConvertOptions(requantize=True))
    gate = {r.prefix: r for r in report.layers}["model.layers.0.mlp.gate_proj"]
    assert gate.how == "requantized" and gate.target == "Q4_0"
    assert gate.rel_error is not None and 0 < gate.rel_error < 0.2
    # A GGUF source's tokenizer metadata is carried over as it is.
    assert LLM(str(out), dtype="float32").tokenizer.encode("Hi there") == LLM(str(src)).tokenizer.encode(
        "Hi there"
    )  # type: ignore[union-attr]
