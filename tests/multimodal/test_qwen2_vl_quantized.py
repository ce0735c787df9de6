"""A quantized Qwen2-VL: the language model quantized (GPTQ int4 through `anyquant quantize`'s
writer), the vision tower left unquantized or quantized too; the tensors present decide, and
zero-size quantization tensors in the vision tower mean "unquantized". Logits with an image are
checked against transformers running the same (dequantized) weights."""

from __future__ import annotations

from pathlib import Path

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
from anyquant.utils.tiny_vlm import IMAGE_PAD, write_tiny_vlm
from tests.helpers.images import QWEN2_VL_PLACEHOLDER, random_image
from tests.helpers.vlm_references import qwen2_vl_inputs

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vlm(tmp_path_factory.mktemp("vlm-src"), seed=31)


def quantize(source: Path, dst: Path, skip: list[str]) -> Path:
    quantize_checkpoint(source, dst, "gptq", WriteOptions(bits=4, group_size=32, sym=True), skip=skip)
    return dst


def dequantized_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as transformers names it, quantized layers dequantized."""
    ckpt = Checkpoint(path)
    fmt = detect_format(ckpt)
    assert fmt is not None
    state = {n: ckpt.read(n) for n in ckpt.index if ckpt.index.info(n).numel}
    prefixes = {n.rsplit(".", 1)[0] for n in state if n.endswith(".qweight")}
    for prefix in prefixes:
        spec = fmt.spec_for(prefix, "linear")
        assert spec is not None
        names = fmt.stored_names(prefix, spec)
        stored = {n: state.pop(n) for n in [*names.required, *names.optional] if n in state}
        state[f"{prefix}.weight"] = dequantize(fmt.decode(prefix, spec, stored))
    return state


def reference_logits(
    source: Path, state: dict[str, torch.Tensor], ids: list[int], image: object
) -> torch.Tensor:
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    renamed = {}
    for name, tensor in state.items():  # checkpoint names -> the module's names
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model."):
            name = "model.language_model." + name.removeprefix("model.")
        renamed[name] = tensor
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    with torch.no_grad():
        return model(**qwen2_vl_inputs(source, ids, [image])).logits[0]


def check_against_reference(llm: LLM, source: Path, path: Path) -> float:
    image = random_image(90, 70, 7)
    assert llm.tokenizer is not None
    prompt = llm.tokenizer.encode(f"see {QWEN2_VL_PLACEHOLDER} here")
    ours = llm.logits(prompt, {"image": image})
    ids, _ = llm.prepare_multimodal(prompt, {"image": image})
    ref = reference_logits(source, dequantized_state(path), ids, image)
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def lm_only(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize(source, tmp_path_factory.mktemp("vlm-gptq") / "gptq", skip=["visual"])


def test_quantized_lm_with_unquantized_vision_tower(source: Path, lm_only: Path) -> None:
    path = lm_only
    llm = LLM(path, dtype="float32")
    quantized = {p.prefix for p in llm.loaded.plans if p.spec is not None}
    vision = [p.prefix for p in llm.loaded.plans if p.prefix.startswith("visual.")]
    assert vision and not quantized & set(vision)
    assert "model.layers.0.mlp.down_proj" in quantized
    assert check_against_reference(llm, source, path) < 1e-4


def test_zero_size_quantization_tensors_in_the_vision_tower_load_as_unquantized(
    source: Path, tmp_path: Path
) -> None:
    path = quantize(source, tmp_path / "gptq-empty", skip=["visual"])
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    for name in ("qweight", "qzeros", "scales", "g_idx"):  # what some tools write for skipped layers
        tensors[f"visual.blocks.0.attn.qkv.{name}"] = torch.empty(0, dtype=torch.int32)
    save_file(tensors, str(file), metadata={"format": "pt"})
    llm = LLM(path, dtype="float32")
    plan = next(p for p in llm.loaded.plans if p.prefix == "visual.blocks.0.attn.qkv")
    assert plan.spec is None
    assert check_against_reference(llm, source, path) < 1e-4


def test_quantized_vision_tower_too(source: Path, tmp_path: Path) -> None:
    path = quantize(source, tmp_path / "gptq-all", skip=[])
    llm = LLM(path, dtype="float32")
    quantized = {p.prefix for p in llm.loaded.plans if p.spec is not None}
    assert "visual.blocks.1.mlp.fc2" in quantized and "visual.merger.mlp.0" in quantized
    assert check_against_reference(llm, source, path) < 1e-4


def test_inspect_reports_the_vision_parts(lm_only: Path) -> None:
    doc = describe_checkpoint(lm_only, tp=2)
    vision = doc["vision"]
    assert (vision["linear_layers"], vision["quantized_layers"]) == (10, 0)  # 2 blocks x 4 + merger 2
    assert vision["placeholder_token_id"] == IMAGE_PAD
    reference = transformers.Qwen2VLImageProcessorPil.from_pretrained(lm_only)
    assert vision["tokens_per_448x448_image"] == reference.get_number_of_image_patches(448, 448) // 4
    memory = doc["tensor_parallel"]["memory_per_rank"]
    assert memory["encoder_cache"] == vision["encoder_cache_bytes"] > 0
