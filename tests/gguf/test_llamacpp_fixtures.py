"""Files written by llama.cpp's own converter and llama-quantize (tests/fixtures/gguf, regenerated
by tests/fixtures/generate/make_gguf_fixtures.py): our logits agree with llama.cpp's own logits on
each file well within that type's quantization noise (llama.cpp vs the float32 source model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from anyquant import LLM

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
REFERENCE = FIXTURES / "llamacpp_logits.safetensors"


def _meta() -> dict[str, str]:
    with safe_open(str(REFERENCE), framework="pt") as f:
        return dict(f.metadata())


TYPES = json.loads(_meta()["types"])
PROMPT = json.loads(_meta()["prompt"])


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE))


def _rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).norm() / scale.norm())


@pytest.mark.parametrize("kind", TYPES)
def test_logits_agree_with_llamacpp_within_the_types_noise(
    kind: str, reference: dict[str, torch.Tensor]
) -> None:
    source = reference["transformers_fp32"]
    theirs = reference[kind]
    ours = LLM(str(FIXTURES / f"tiny-qwen2-{kind}.gguf"), dtype="float32").logits(PROMPT)
    noise = _rel(theirs, source, source)  # what quantizing to this type costs, as llama.cpp runs it
    assert noise > 1e-3, kind  # the file is really quantized
    # llama.cpp also rounds activations to 8 bits for its quantized dot products (we multiply the
    # exact weights by float32 activations): ~2-2.7 % of the logits' norm on this random model for
    # every type (its F32 file differs by 5e-4), which is within even Q8_0's weight noise (3 %).
    assert _rel(ours, theirs, source) < noise, (kind, _rel(ours, theirs, source), noise)
    # And we lose no more to the quantization than llama.cpp does.
    assert _rel(ours, source, source) < 1.1 * noise + 5e-3, (kind, _rel(ours, source, source), noise)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.75


def test_float32_file_is_the_source_model(reference: dict[str, torch.Tensor]) -> None:
    """llama.cpp's own F32 run of its converter's output matches the transformers source (up to
    its fp16 KV cache: ~5e-4 measured)."""
    assert _rel(reference["F32"], reference["transformers_fp32"], reference["transformers_fp32"]) < 2e-3
