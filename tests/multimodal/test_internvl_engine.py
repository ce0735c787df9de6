"""InternVL images through `LLM.generate` (vLLM's prompt shape) on the engine's multimodal plumbing:
greedy tokens equal a transformers greedy loop on InternVLForConditionalGeneration with the same
weights (Qwen2 and InternLM2 language models), the `<img>` / `</img>` wrapping of the placeholders,
and a text-only request in the same batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("anyquant.models.multimodal")  # the engine's image plumbing

from anyquant import LLM, SamplingParams
from tests.helpers.images import random_image
from tests.models._internvl import IMG_CONTEXT_ID, write_internvl

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return write_internvl(tmp_path_factory.mktemp(request.param), request.param, seed=5)


def test_greedy_generation_with_images_equals_transformers(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    llm = LLM(path, dtype="float32")
    images = [random_image(120, 50, 1), random_image(40, 90, 2)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompt = {
        "prompt": "look <IMG_CONTEXT> and <img><IMG_CONTEXT></img> then",
        "multi_modal_data": {"image": images},
    }
    outs = llm.generate([prompt, "plain text"], params)
    ids = outs[0].prompt_token_ids
    processor = llm.image_processor()
    tiles = [processor.process(im).tensors["pixel_values"] for im in images]
    runs = [i for i, t in enumerate(ids) if t == IMG_CONTEXT_ID and ids[i - 1] != IMG_CONTEXT_ID]
    assert len(runs) == 2 and all(ids[i - 1] == processor.start_id for i in runs)
    assert ids.count(processor.start_id) == 2 and ids.count(processor.end_id) == 2
    assert ids.count(IMG_CONTEXT_ID) == sum(t.shape[0] for t in tiles) * llm.model.tokens_per_tile
    seq, expected = list(ids), []
    for _ in range(5):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([seq]), pixel_values=torch.cat(tiles)).logits[0, -1]
        expected.append(int(logits.argmax()))
        seq.append(expected[-1])
    assert outs[0].token_ids == expected
    assert outs[1].token_ids == llm.generate("plain text", params)[0].token_ids


def test_token_counts_from_the_size_alone_equal_the_processed_image(checkpoint: tuple[Path, Any]) -> None:
    """What `inspect` and prompt budgets use (no pixels decoded) matches real processing."""
    processor = LLM(checkpoint[0], dtype="float32").image_processor()
    for i, (w, h) in enumerate([(120, 50), (40, 90), (448, 448), (1000, 200), (30, 30)]):
        real = processor.process(random_image(w, h, i)).num_tokens
        assert processor.num_tokens_for(w, h) == real <= processor.max_tokens_per_image
