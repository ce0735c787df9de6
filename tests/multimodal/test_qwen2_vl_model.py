"""Qwen2-VL / Qwen2.5-VL against transformers in fp32: image preprocessing, and logits of prompts
with two images of different sizes and aspect ratios, in both tensor layouts and config layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant.engine.kv_cache import SequenceCache
from anyquant.loading.loader import load_model
from anyquant.models.base import InputEmbeds
from anyquant.models.multimodal import ImageInputError
from anyquant.models.qwen2_vl_processor import Qwen2VLImageProcessor
from anyquant.utils.tiny_vlm import IMAGE_PAD, VISION_END, VISION_START, write_tiny_vlm
from tests.helpers.images import random_image
from tests.helpers.vlm_references import qwen2_vl_inputs

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


VISION = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}


@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(448, 448, "RGB"), (37, 91, "RGB"), (1500, 700, "RGB"), (300, 200, "RGBA"), (64, 250, "L")],
)
def test_preprocessing_equals_transformers(tmp_path: Path, width: int, height: int, mode: str) -> None:
    reference = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    reference.save_pretrained(tmp_path)
    ours = Qwen2VLImageProcessor(tmp_path, {}, VISION)
    image = random_image(width, height, mode=mode)
    expected = reference([image], return_tensors="pt")
    got = ours.process(image)
    assert got.tensors["grid_thw"].tolist() == expected["image_grid_thw"][0].tolist()
    torch.testing.assert_close(got.tensors["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    t, h, w = expected["image_grid_thw"][0].tolist()
    assert got.num_tokens == t * h * w // 4


def test_preprocessing_refuses_extreme_aspect_ratio(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="aspect ratio"):
        Qwen2VLImageProcessor(tmp_path, {}, VISION).process(random_image(2010, 10))


LAYOUTS = {
    "qwen2-vl": dict(v25=False),
    "qwen2.5-vl": dict(v25=True),
    "qwen2-vl-flat-config": dict(v25=False, flat_config=True),
    "qwen2.5-vl-nested-names": dict(v25=True, nested_names=True),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    options = LAYOUTS[request.param]
    return write_tiny_vlm(tmp_path_factory.mktemp(request.param), seed=5, **options), bool(options["v25"])


def reference_logits(path: Path, v25: bool, ids: list[int], images: list[object]) -> torch.Tensor:
    cls = (
        transformers.Qwen2_5_VLForConditionalGeneration
        if v25
        else transformers.Qwen2VLForConditionalGeneration
    )
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**qwen2_vl_inputs(path, ids, images)).logits[0].float()


def test_logits_with_two_images_equal_transformers(checkpoint: tuple[Path, bool]) -> None:
    path, v25 = checkpoint
    images = [random_image(130, 70, seed=1), random_image(60, 120, seed=2)]
    prompt = [256, 10, 20, VISION_START, IMAGE_PAD, VISION_END, 30, VISION_START, IMAGE_PAD, VISION_END, 50]
    model = load_model(path, dtype="float32").model
    processor = model.image_processor(path)
    inputs = [processor.process(im) for im in images]
    ids, spans = processor.expand_placeholders(prompt, inputs)
    positions, _ = processor.prompt_positions(ids, inputs, spans)
    rows = torch.cat([torch.arange(start, start + n) for start, n in spans])
    embeds = InputEmbeds(rows, torch.cat(model.embed_images(inputs)))
    cache = SequenceCache(model, len(ids), torch.float32)
    with torch.inference_mode():
        ours = model(torch.tensor(ids), positions, cache.context(0, len(ids)), None, embeds)
    ref = reference_logits(path, v25, ids, images)
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < 1e-5, rel
