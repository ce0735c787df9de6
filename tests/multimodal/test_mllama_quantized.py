"""A quantized Llama-3.2-Vision: the language model quantized (GPTQ int4 and compressed-tensors
W4A16 through `anyquant quantize`'s writers), the vision tower, projector and cross-attention
layers left unquantized; the tensors present decide. The case that motivated the issue: a GPTQ
checkpoint whose skipped vision and cross-attention layers carry zero-size quantization tensors
(qweight/scales of shape [0, ...]) beside their float weights loads them as float layers. Logits
with two images are checked against transformers running the same (dequantized) weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant import LLM
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.describe import describe_checkpoint
from anyquant.quant.detect import detect_format
from anyquant.quant.formats.base import WriteOptions
from anyquant.quant.reference import dequantize
from anyquant.utils.tiny_mllama import IMAGE, nested_name, write_tiny_mllama
from tests.helpers.vlm_references import mllama_inputs

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
processing = pytest.importorskip("transformers.models.mllama.processing_mllama")

# The vision tower, the projector and the whole cross-attention layer (index 1) stay float.
SKIP = ["vision_model", "multi_modal_projector", r"layers\.1\."]


def random_image(width: int, height: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mllama(tmp_path_factory.mktemp("mllama-src"), seed=31)


def quantize(source: Path, dst: Path, fmt: str = "gptq") -> Path:
    options = (
        WriteOptions(bits=4, group_size=32, sym=True)
        if fmt == "gptq"
        else WriteOptions(scheme="W4A16", group_size=32)
    )
    quantize_checkpoint(source, dst, fmt, options, skip=SKIP)
    return dst


def dequantized_state(llm: LLM) -> dict[str, torch.Tensor]:
    """Every tensor with data as transformers names it in memory, quantized layers dequantized."""
    ckpt = Checkpoint(llm.path)
    fmt = detect_format(ckpt)
    assert fmt is not None
    state = {n: ckpt.read(n) for n in ckpt.index if ckpt.index.info(n).numel}
    for plan in llm.loaded.plans:
        if plan.spec is None:
            continue
        names = fmt.stored_names(plan.prefix, plan.spec)
        stored = {n: state.pop(n) for n in [*names.required, *names.optional] if n in state}
        state[f"{plan.prefix}.weight"] = dequantize(fmt.decode(plan.prefix, plan.spec, stored))
    return {nested_name(n): t for n, t in state.items()}


def reference_logits(source: Path, llm: LLM, ids: list[int], images: list[Any]) -> torch.Tensor:
    model = transformers.MllamaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dequantized_state(llm), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    with torch.no_grad():
        return model(**mllama_inputs(source, ids, images)).logits[0]


def check_against_reference(llm: LLM, source: Path) -> float:
    images = [random_image(90, 40, 7), random_image(30, 70, 8)]
    assert llm.tokenizer is not None
    ids = llm.tokenizer.encode("see <|image|> and <|image|> here")
    ours = llm.logits(ids, {"image": images})
    ref = reference_logits(source, llm, ids, images)
    return float((ours - ref).norm() / ref.norm())


def float_layers(llm: LLM) -> tuple[set[str], set[str]]:
    """(quantized prefixes, prefixes of the vision tower, projector and cross-attention layer)."""
    quantized = {p.prefix for p in llm.loaded.plans if p.spec is not None}
    kept = {p.prefix for p in llm.loaded.plans if any(re.search(s, p.prefix) for s in SKIP)}
    return quantized, kept


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_quantized_lm_with_float_vision_and_cross_attention(source: Path, tmp_path: Path, fmt: str) -> None:
    path = quantize(source, tmp_path / fmt, fmt)
    llm = LLM(path, dtype="float32")
    quantized, kept = float_layers(llm)
    assert "language_model.model.layers.0.mlp.down_proj" in quantized
    assert "language_model.model.layers.1.cross_attn.k_proj" in kept and "multi_modal_projector" in kept
    assert kept and not quantized & kept
    assert check_against_reference(llm, source) < 1e-4


def test_zero_size_quantization_tensors_load_as_float_layers(source: Path, tmp_path: Path) -> None:
    path = quantize(source, tmp_path / "gptq-empty")
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    empty = {"qweight": (0, 64), "qzeros": (0, 8), "scales": (0, 64), "g_idx": (0,)}
    layers = [
        "vision_model.transformer.layers.0.self_attn.q_proj",
        "vision_model.global_transformer.layers.0.self_attn.q_proj",
        "language_model.model.layers.1.cross_attn.k_proj",
        "language_model.model.layers.1.mlp.down_proj",
        "multi_modal_projector",
    ]
    for layer in layers:  # what some tools write for the layers they skipped
        for name, shape in empty.items():
            dtype = torch.float16 if name == "scales" else torch.int32
            tensors[f"{layer}.{name}"] = torch.empty(shape, dtype=dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})
    llm = LLM(path, dtype="float32")
    plans = {p.prefix: p for p in llm.loaded.plans}
    assert all(plans[layer].spec is None for layer in layers)
    assert plans["language_model.model.layers.0.mlp.down_proj"].spec is not None
    assert check_against_reference(llm, source) < 1e-4


def test_inspect_reports_the_vision_parts(source: Path, tmp_path: Path) -> None:
    doc = describe_checkpoint(quantize(source, tmp_path / "gptq"), tp=2)
    vision = doc["vision"]
    # 3 vision layers x 6 linears + the projector; the cross-attention layer belongs to the LM.
    assert (vision["linear_layers"], vision["quantized_layers"]) == (19, 0)
    assert vision["placeholder_token_id"] == IMAGE
    # 4 tiles x (16 patches + class token) keys; 1 layer x (k, v) x 1 KV head per rank x 16 x fp32
    assert vision["cross_attention"] == {
        "layers": [1],
        "keys_per_image": 68,
        "kv_bytes_per_image": 2 * 68 * 16 * 4,
    }
    memory = doc["tensor_parallel"]["memory_per_rank"]
    assert memory["encoder_cache"] == vision["encoder_cache_bytes"] > 0


def test_quantized_vision_tower_and_cross_attention_too(source: Path, tmp_path: Path) -> None:
    path = tmp_path / "gptq-all"
    quantize_checkpoint(source, path, "gptq", WriteOptions(bits=4, group_size=32, sym=True))
    llm = LLM(path, dtype="float32")
    quantized = {p.prefix for p in llm.loaded.plans if p.spec is not None}
    for layer in (
        "vision_model.transformer.layers.1.self_attn.o_proj",
        "vision_model.global_transformer.layers.0.self_attn.q_proj",
        "language_model.model.layers.1.cross_attn.v_proj",
        "multi_modal_projector",
    ):
        assert layer in quantized
    assert "vision_model.transformer.layers.0.mlp.fc1" not in quantized  # 48 wide: the writer skips it
    assert check_against_reference(llm, source) < 1e-4
