"""Quantized vision-language checkpoints (Qwen2-VL, Qwen2.5-VL, Llama-3.2-Vision) written by the
real tools (llm-compressor, GPT-QModel, AutoAWQ, lmdeploy), against the logits their own loaders
compute on prompts with 0, 1 and 2 images.

The fixtures are committed under tests/fixtures/third_party_vlm (its README gives the tool, the
recipe and the reference loader of each); tests/fixtures/generate made them. The images are stored
as pixels and preprocessed by anyquant; the placeholder expansion is checked against the ids
transformers' processor produced (mllama's `<|image|>` is not expanded: the ids stay as sent).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from anyquant import LLM, SamplingParams
from anyquant.loading.describe import describe_checkpoint
from tests.helpers.errors import rel_err

pytestmark = pytest.mark.slow
Image = pytest.importorskip("PIL.Image")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "third_party_vlm"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
PROMPTS = 3  # 0, 1 and 2 images
# The MoE fixtures' policy (tests/loading/test_third_party_moe.py): the reference runs the tool's
# loader, anyquant its own kernels; both compute in fp32.
REL_L2 = 2e-2
ARGMAX_AGREE = 0.98
# Left unquantized by every tool here: Qwen2-VL's vision tower; mllama's tower, projector, cross-attention.
FLOAT_PARTS = re.compile(r"visual|vision_model|multi_modal_projector|cross_attn")


def images(ref: dict[str, torch.Tensor], i: int) -> list[Any]:
    out, k = [], 0
    while f"image_{i}_{k}" in ref:
        out.append(Image.fromarray(ref[f"image_{i}_{k}"].numpy()))
        k += 1
    return out


def mm_data(ref: dict[str, torch.Tensor], i: int) -> dict[str, Any] | None:
    ims = images(ref, i)
    return {"image": ims} if ims else None


@pytest.fixture(scope="module", params=NAMES)
def fixture(request: pytest.FixtureRequest) -> tuple[str, LLM, dict[str, torch.Tensor]]:
    name = request.param
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    return name, LLM(FIXTURES / name, dtype="float32"), ref


def test_fixtures_are_present_and_documented() -> None:
    assert len(NAMES) >= 11, NAMES
    readme = (FIXTURES / "README.md").read_text()
    for name in NAMES:
        assert f"`{name}`" in readme, name
        report = json.loads((FIXTURES / name / "reference.json").read_text())
        assert report["checkpoint"] == name and report["compute_dtype"] == "float32"


def test_placeholders_expand_as_the_reference_processor_did(
    fixture: tuple[str, LLM, dict[str, torch.Tensor]],
) -> None:
    _, llm, ref = fixture
    for i in range(PROMPTS):
        ids, mm = llm.prepare_multimodal(ref[f"prompt_{i}"].tolist(), mm_data(ref, i))
        assert ids == ref[f"ids_{i}"].tolist(), i
        if f"num_tiles_{i}" in ref:  # mllama: each image tiled as transformers' processor tiled it
            assert mm is not None
            tiles = [int(im.tensors["num_tiles"]) for im in mm.images]
            ratios = [int(im.tensors["aspect_ratio_id"]) for im in mm.images]
            assert tiles == ref[f"num_tiles_{i}"].tolist(), (i, tiles)
            assert ratios == ref[f"aspect_ratio_ids_{i}"][: len(ratios)].tolist(), (i, ratios)


def test_logits_and_greedy_tokens_reproduce_reference(
    fixture: tuple[str, LLM, dict[str, torch.Tensor]],
) -> None:
    name, llm, ref = fixture
    for i in range(PROMPTS):
        ours = llm.logits(ref[f"prompt_{i}"].tolist(), mm_data(ref, i))
        theirs = ref[f"logits_{i}"]
        assert ours.shape == theirs.shape, (name, i, ours.shape, theirs.shape)
        assert rel_err(ours, theirs) <= REL_L2, (name, i, rel_err(ours, theirs))
        agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
        assert agree >= ARGMAX_AGREE, (name, i, agree)
    report = json.loads((FIXTURES / name / "reference.json").read_text())
    index = report["greedy"]["prompt_index"]
    tokens = ref["greedy_tokens"].tolist()
    prompt = {"prompt_token_ids": ref[f"prompt_{index}"].tolist(), "multi_modal_data": mm_data(ref, index)}
    # The reference never picks image/video placeholder ids (transformers would read them as image rows).
    banned = {t: -1e9 for t in report["greedy"]["banned_token_ids"]}
    params = SamplingParams(max_tokens=len(tokens), temperature=0.0, ignore_eos=True, logit_bias=banned)
    assert llm.generate([prompt], params)[0].token_ids == tokens


ACTIVATION_QUANTIZED = [
    n for n in NAMES if "wonly_logits_0" in load_file(str(FIXTURES / n / "reference.safetensors"))
]


@pytest.mark.parametrize("name", ACTIVATION_QUANTIZED)
def test_activation_quantization_is_applied(name: str) -> None:
    """Activation-quantized fixtures: our logits are much nearer the reference than the reference's
    own weight-only run is (a path that skipped activation quantization would not be)."""
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    llm = LLM(FIXTURES / name, dtype="float32")
    for i in range(PROMPTS):
        ours = llm.logits(ref[f"prompt_{i}"].tolist(), mm_data(ref, i))
        gap = rel_err(ref[f"wonly_logits_{i}"], ref[f"logits_{i}"])
        assert rel_err(ours, ref[f"logits_{i}"]) < gap / 4, (name, i, rel_err(ours, ref[f"logits_{i}"]), gap)


def test_inspect_shows_the_vision_tower_unquantized(
    fixture: tuple[str, LLM, dict[str, torch.Tensor]],
) -> None:
    name, llm, _ = fixture
    vision = describe_checkpoint(FIXTURES / name)["vision"]
    assert vision["linear_layers"] > 0 and vision["quantized_layers"] == 0, vision
    quantized = {p.prefix for p in llm.loaded.plans if p.spec is not None}
    assert quantized and not any(FLOAT_PARTS.search(p) for p in quantized), sorted(quantized)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    if config["model_type"] == "mllama":
        # Llama-3.2-Vision: the cross-attention decoder layers (projections and MLP) are plain float
        # tensors, loaded as float layers; the self-attention layers around them are quantized.
        cross = set(config["text_config"]["cross_attention_layers"])
        floats = {p.prefix for p in llm.loaded.plans if p.spec is None}
        assert all(any(f"layers.{i}.cross_attn.k_proj" in p for p in floats) for i in cross), sorted(floats)
        layer = re.compile(r"layers\.(\d+)\.")
        indices = {int(m.group(1)) for p in quantized if (m := layer.search(p))}
        assert indices and not indices & cross, (sorted(indices), cross)


@pytest.mark.parametrize(
    "name", ["qwen2vl-gptq-4bit-g64-sym-gptqmodel", "mllama-gptq-4bit-g32-sym-gptqmodel"]
)
def test_tp2_pads_the_mlp_and_reproduces_the_reference(name: str) -> None:
    """GPT-QModel's group-64 Qwen2-VL (MLP 192) and group-32 Llama-3.2-Vision (MLP 96) at tensor
    parallel 2: 1.5 groups per rank, zero-padded exactly; logits with images equal the reference
    as at TP 1 (mllama: its float cross-attention layer and cached image K/V split by heads too)."""
    path = FIXTURES / name
    padding = describe_checkpoint(path, tp=2)["tensor_parallel"]["padding"]
    assert any(p["pattern"].endswith("layers.*.mlp") and sum(p["padding_per_rank"]) for p in padding), padding
    ref = load_file(str(path / "reference.safetensors"))
    with LLM(path, dtype="float32", tensor_parallel_size=2) as llm:
        for i in range(PROMPTS):
            ours = llm.logits(ref[f"prompt_{i}"].tolist(), mm_data(ref, i))
            assert rel_err(ours, ref[f"logits_{i}"]) <= 1e-5, (i, rel_err(ours, ref[f"logits_{i}"]))
