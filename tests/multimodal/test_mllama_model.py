"""Llama-3.2-Vision (mllama) against transformers in fp32: image preprocessing, the cross-attention
ranges of a prompt, and logits of prompts with one and two images of different sizes and aspect
ratios and of text-only prompts, in both tensor layouts and both config layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant.engine.kv_cache import SequenceCache
from anyquant.engine.multimodal import one_off_cross_step, prepare_prompt
from anyquant.loading.loader import load_model
from anyquant.models.mllama_processor import MllamaImageProcessor
from anyquant.models.multimodal import ImageInputError
from anyquant.utils.tiny_mllama import IMAGE, write_tiny_mllama
from tests.helpers.vlm_references import mllama_inputs

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
processing = pytest.importorskip("transformers.models.mllama.processing_mllama")


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> object:
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = (torch.rand(height, width, channels, generator=g) * 255).byte().numpy()
    return Image.fromarray(data[..., 0] if mode == "L" else data, mode)


@pytest.mark.parametrize(
    ("width", "height", "mode", "tile", "max_tiles"),
    [
        (560, 560, "RGB", 560, 4),
        (1000, 300, "RGB", 560, 4),  # downscaled onto 1 x 4 tiles
        (37, 91, "RGB", 56, 4),  # upscaled, 2 x 1 tiles
        (300, 200, "RGBA", 32, 4),
        (64, 250, "L", 32, 6),
        (20, 20, "RGB", 32, 1),
    ],
)
def test_preprocessing_equals_transformers(
    tmp_path: Path, width: int, height: int, mode: str, tile: int, max_tiles: int
) -> None:
    reference = transformers.MllamaImageProcessorPil(
        size={"height": tile, "width": tile}, max_image_tiles=max_tiles
    )
    reference.save_pretrained(tmp_path)
    ours = MllamaImageProcessor(tmp_path, {"image_token_index": IMAGE}, tile, max_tiles, 8)
    image = random_image(width, height, mode)
    expected = reference([[image]], return_tensors="pt")
    got = ours.process(image)
    torch.testing.assert_close(got.tensors["pixel_values"], expected["pixel_values"][0, 0], rtol=0, atol=1e-6)
    assert int(got.tensors["aspect_ratio_id"]) == int(expected["aspect_ratio_ids"][0, 0])
    assert int(got.tensors["num_tiles"]) == expected["num_tiles"][0][0]
    mask = expected["aspect_ratio_mask"][0, 0]
    assert int(mask.sum()) == int(got.tensors["num_tiles"])
    assert got.num_tokens == 1 and got.encoder_rows == max_tiles * ((tile // 8) ** 2 + 1)


def test_preprocessing_settings_must_agree_with_the_model(tmp_path: Path) -> None:
    transformers.MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(Exception, match="max_image_tiles 2 disagree"):
        MllamaImageProcessor(tmp_path, {}, 32, 4, 8)


@pytest.mark.parametrize(
    "ids",
    [
        [1, 2, IMAGE, 3, 4],
        [IMAGE, 1, 2, IMAGE, 3],
        [1, IMAGE, IMAGE, 2, IMAGE, 3, 4],  # adjacent images share the rest of the prompt
        [1, IMAGE, 2, IMAGE, IMAGE],
    ],
)
def test_cross_attention_ranges_equal_transformers(tmp_path: Path, ids: list[int]) -> None:
    transformers.MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4).save_pretrained(
        tmp_path
    )
    ours = MllamaImageProcessor(tmp_path, {"image_token_index": IMAGE}, 32, 4, 8)
    sizes = [(40, 90), (100, 30), (32, 32)]
    images = [ours.process(random_image(*sizes[i % 3], seed=i)) for i in range(ids.count(IMAGE))]
    tiles = [int(im.tensors["num_tiles"]) for im in images]
    sparse = processing.get_cross_attention_token_mask(ids, IMAGE)
    dense = processing.convert_sparse_cross_attention_mask_to_dense([sparse], [tiles], 4, len(ids))[0]
    got = torch.zeros(len(ids), len(images), 4, dtype=torch.long)
    for i, cross in enumerate(ours.cross_images(ids, images)):
        end = len(ids) if cross.end_token < 0 else cross.end_token
        got[cross.first_token : end, i, : cross.valid_keys // 17] = 1
    assert got.tolist() == torch.as_tensor(dense).tolist()
    with pytest.raises(ImageInputError, match="one <\\|image\\|> per image"):
        ours.cross_images(ids, images[:-1])


LAYOUTS = {"hub": {}, "nested-names": {"nested_names": True}, "hub-config": {"hub_config": True}}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mllama(tmp_path_factory.mktemp("mllama"), seed=5)


@pytest.fixture(scope="module")
def reference(source: Path) -> object:
    return transformers.MllamaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()


def reference_logits(model: object, path: Path, ids: list[int], images: list[object]) -> torch.Tensor:
    with torch.no_grad():
        return model(**mllama_inputs(path, ids, images)).logits[0]  # type: ignore[operator]


PROMPTS = {
    "one image": ([BOS := 256, 10, 20, IMAGE, 30, 40, 50], [(130, 70)]),
    "two images": ([256, 10, IMAGE, 20, 30, IMAGE, 40, 50, 60], [(130, 70), (40, 100)]),
    "text only": ([256, 10, 20, 30, 40], []),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_equal_transformers(
    source: Path, reference: object, tmp_path_factory: pytest.TempPathFactory, layout: str
) -> None:
    path = (
        source
        if layout == "hub"
        else write_tiny_mllama(tmp_path_factory.mktemp(layout), seed=5, **LAYOUTS[layout])
    )
    model = load_model(path, dtype="float32").model
    processor = model.image_processor(path)
    for name, (ids, sizes) in PROMPTS.items():
        images = [random_image(w, h, seed=i + 1) for i, (w, h) in enumerate(sizes)]
        cache = SequenceCache(model, len(ids), torch.float32)
        extra = {}
        if images:
            ids2, mm = prepare_prompt(processor, ids, images)
            assert ids2 == ids  # <|image|> stays one token
            states = torch.cat(model.embed_images(mm.images))
            extra["cross"] = one_off_cross_step(mm, states, len(ids))
        with torch.inference_mode():
            ours = model(torch.tensor(ids), torch.arange(len(ids)), cache.context(0, len(ids)), None, **extra)
        ref = reference_logits(reference, source, ids, images)
        rel = float((ours - ref).norm() / ref.norm())
        assert rel < 1e-4, (name, rel)
    assert len(model.cross_states) == 0  # one-off states are not kept
