"""InternVL (trust_remote_code layout) against transformers' InternVLForConditionalGeneration in fp32:
image embeddings and end-to-end logits on prompts with one and two images of different sizes and
aspect ratios, for a Qwen2 and an InternLM2 language model, a LayerNorm encoder with qkv bias and an
RMSNorm one with q/k normalisation whose position table is resized (6B style)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from anyquant.engine.kv_cache import SequenceCache
from anyquant.loading.loader import load_model
from anyquant.models.internvl import InternVLChatModel
from tests.helpers.errors import rel_err
from tests.models._internvl import IMG_CONTEXT_ID, image_rows, write_internvl

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-layernorm": ("qwen2", {}),
    # Trained on 28-pixel tiles (a 2x2 patch grid), run on 56-pixel ones: the table is resized.
    "internlm2-rmsnorm-qknorm": (
        "internlm2",
        {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False, "image_size": 28},
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    family, vision = CASES[request.param]
    path, hf = write_internvl(tmp_path_factory.mktemp(request.param), family, seed=3, **vision)
    model = load_model(path, dtype="float32").model
    assert isinstance(model, InternVLChatModel)
    return model, hf


def _image(width: int, height: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return PIL.fromarray(data.numpy(), "RGB")


def test_image_embeddings_match(tiny: tuple[Any, Any]) -> None:
    model, hf = tiny
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    ours = model.encode_tiles(pixels)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=pixels).pooler_output
    assert ours.shape == (3 * model.tokens_per_tile, hf.config.text_config.hidden_size)
    assert rel_err(ours, ref.reshape(ours.shape)) < 1e-5


def _ids(model: InternVLChatModel, tiles: list[int]) -> list[int]:
    """The expanded prompt, tokenized by hand: bytes, then <img>=259, <IMG_CONTEXT>=261, </img>=260."""
    text = model.expand_image_prompt("Look: <image> and <image>?"[: 12 if len(tiles) == 1 else None], tiles)
    ids = [256]
    for part in text.replace("<img>", "\0<img>\0").replace("</img>", "\0</img>\0").split("\0"):
        if part == "<img>":
            ids.append(259)
        elif part == "</img>":
            ids.append(260)
        else:
            ids.extend(IMG_CONTEXT_ID for _ in range(part.count("<IMG_CONTEXT>")))
            ids.extend(part.replace("<IMG_CONTEXT>", "").encode())
    return ids


@pytest.mark.parametrize("sizes", [[(90, 40)], [(200, 60), (50, 100)]], ids=["one-image", "two-images"])
def test_logits_with_images_match(tiny: tuple[Any, Any], sizes: list[tuple[int, int]]) -> None:
    model, hf = tiny
    pixels = [model.image_pixels(_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    assert len({p.shape[0] for p in pixels}) == len(pixels)  # different tile counts per image
    ids = _ids(model, [p.shape[0] for p in pixels])
    tokens = torch.tensor(ids)
    with torch.inference_mode():
        images = torch.cat(model.embed_images([SimpleNamespace(tensors={"pixel_values": p}) for p in pixels]))
        seq = SequenceCache(model, len(ids), torch.float32)
        ctx = seq.context(0, len(ids))
        ours = model(tokens, torch.arange(len(ids)), ctx, input_embeds=image_rows(tokens, images))
        ref = hf(input_ids=tokens[None], pixel_values=torch.cat(pixels)).logits[0]
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_text_only_forward_is_the_language_model(tiny: tuple[Any, Any]) -> None:
    model, hf = tiny
    ids = [256, 72, 105, 33, 10, 65]
    ours = SequenceCache(model, len(ids), torch.float32).forward(ids, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    assert rel_err(ours, ref) < 1e-5
