"""`anyquant convert` from a GGUF file (llama.cpp's own fixtures in tests/fixtures/gguf): Q4_0 and
Q8_0 are written exactly as GPTQ / compressed-tensors (checked against gguf-py's own
dequantization and by running both), with the tokenizer files taken from the GGUF metadata; types
with float offsets are refused per layer, or re-quantized on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anyquant import LLM
from anyquant.convert.converter import ConversionRefused, ConvertOptions, convert_checkpoint
from anyquant.tokenizer import Tokenizer

from ._helpers import dequantized_layers, tensors

gguf = pytest.importorskip("gguf")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
# llama.cpp tensor roles -> transformers module names (Qwen2: no row permutation of q / k).
ROLES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 3, 200, 17]


def _reference_weights(kind: str) -> dict[str, torch.Tensor]:
    """transformers name -> float64 weight, dequantized by gguf-py (the independent reference)."""
    out = {}
    for t in gguf.GGUFReader(str(FIXTURES / f"tiny-qwen2-{kind}.gguf")).tensors:
        parts = t.name.split(".")
        if t.name == "output.weight":
            name = "lm_head"
        elif parts[0] == "blk" and parts[2] in ROLES and parts[3] == "weight":
            name = f"model.layers.{parts[1]}.{ROLES[parts[2]]}"
        else:
            continue
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).double()
    return out


@pytest.mark.parametrize("target", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_exact_conversion_from_gguf(kind: str, target: str, tmp_path: Path) -> None:
    src = FIXTURES / f"tiny-qwen2-{kind}.gguf"
    dst = tmp_path / "out"
    report = convert_checkpoint(src, dst, target)
    how = {r.prefix: r.how for r in report.layers}
    assert all(h == "exact" for p, h in how.items() if p != "lm_head"), how
    # llama-quantize keeps this file's LM head at Q6_K (16-element groups): written unquantized
    # in float32, which holds its values exactly; the Q8_0 file's Q8_0 head stays quantized.
    assert how["lm_head"] == ("dequantized" if kind == "Q4_0" else "exact")

    reference = _reference_weights(kind)
    converted = dequantized_layers(dst)
    assert set(reference) <= set(converted)
    for name, want in reference.items():
        got = converted[name]
        assert got is not None and got.shape == want.shape, name
        assert torch.equal(got, want), name  # bit-identical dequantized weights
    if kind == "Q4_0":
        assert tensors(dst)["lm_head.weight"].dtype == torch.float32

    # The converted directory runs with no other files, and computes the same logits.
    direct = LLM(str(src), dtype="float32").logits(PROMPT)
    ours = LLM(str(dst), dtype="float32").logits(PROMPT)
    assert float((ours - direct).abs().max() / direct.abs().max()) < 1e-5
    assert torch.equal(ours.argmax(-1), direct.argmax(-1))


def test_tokenizer_files_come_from_the_gguf_metadata(tmp_path: Path) -> None:
    src = FIXTURES / "tiny-qwen2-Q8_0.gguf"
    dst = tmp_path / "out"
    convert_checkpoint(src, dst, "gptq")
    meta = gguf.GGUFReader(str(src))
    tokens = [str(bytes(meta.fields["tokenizer.ggml.tokens"].parts[i]), "utf-8")
              for i in meta.fields["tokenizer.ggml.tokens"].data]  # fmt: skip
    written = Tokenizer(str(dst))
    llm = LLM(str(src), dtype="float32")
    assert llm.tokenizer is not None
    text = "Hello, world! 123 héllo\n\tend"
    assert written.encode(text) == llm.tokenizer.encode(text)
    # transformers reads the same files and tokenizes the same way.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(dst))
    assert hf(text, add_special_tokens=False).input_ids == written.encode(text)
    assert hf.chat_template == meta.fields["tokenizer.chat_template"].contents()
    config = json.loads((dst / "tokenizer_config.json").read_text())
    eos = meta.fields["tokenizer.ggml.eos_token_id"].parts[-1][0]
    assert config["eos_token"] == tokens[int(eos)]
    assert json.loads((dst / "config.json").read_text())["model_type"] == "qwen2"


def test_float_offsets_are_refused_per_layer(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(ConversionRefused) as info:
        convert_checkpoint(FIXTURES / "tiny-qwen2-Q4_K_M.gguf", dst, "gptq")
    refused = {r.prefix: r.reason or "" for r in info.value.refused}
    assert "float offset per group" in refused["model.layers.0.mlp.gate_proj"]
    assert "model.layers.0.mlp.gate_proj" in str(info.value)
    assert not dst.exists()  # nothing written


def test_requantize_converts_float_offsets_and_reports_the_error(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    report = convert_checkpoint(
        FIXTURES / "tiny-qwen2-Q4_K_M.gguf", dst, "gptq", ConvertOptions(requantize=True)
    )
    gate = {r.prefix: r for r in report.layers}["model.layers.0.mlp.gate_proj"]
    assert gate.how == "requantized" and gate.rel_error is not None and 0 < gate.rel_error < 0.2
    reference = _reference_weights("Q4_K_M")["model.layers.0.mlp.gate_proj"]
    got = dequantized_layers(dst)["model.layers.0.mlp.gate_proj"]
    assert got is not None
    assert abs(float((got - reference).norm() / reference.norm()) - gate.rel_error) < 1e-6
