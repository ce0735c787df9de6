"""`kv_cache_dtype="int8"` with images: a cross-attention family (mllama: its image keys and values
live beside the paged cache, in the compute dtype; its self-attention layers use the int8 pages)
and a family whose prompts hold image rows at M-RoPE positions (Qwen2-VL). Both work: the
teacher-forced logits stay within the float cache's budget, and a batch with images picks the
tokens each request picks alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from anyquant import LLM, SamplingParams
from tests.engine.test_kv_int8_engine import LOGIT_BUDGET
from tests.helpers.images import random_image

pytest.importorskip("transformers")
pytest.importorskip("PIL.Image")


def _mllama(path: Path) -> tuple[Path, str]:
    from anyquant.utils.tiny_mllama import write_tiny_mllama

    return write_tiny_mllama(path, seed=13), "look <|image|> and then"


def _qwen2_vl(path: Path) -> tuple[Path, str]:
    from anyquant.utils.tiny_vlm import write_tiny_vlm

    return write_tiny_vlm(path, seed=31), "look <|vision_start|><|image_pad|><|vision_end|> and then"


FAMILIES: dict[str, Callable[[Path], tuple[Path, str]]] = {"mllama": _mllama, "qwen2_vl": _qwen2_vl}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_images_on_an_int8_cache(family: str, tmp_path: Path) -> None:
    path, text = FAMILIES[family](tmp_path / family)
    flt = LLM(path, dtype="float32", max_model_len=256, enforce_eager=True)
    q8 = LLM(path, dtype="float32", max_model_len=256, enforce_eager=True, kv_cache_dtype="int8")
    assert q8.engine.runner.cache.k.dtype == torch.int8
    assert flt.tokenizer is not None
    image = random_image(60, 40, 3)
    ids = flt.tokenizer.encode(text)
    ref = flt.logits(ids, {"image": image})
    got = q8.logits(ids, {"image": image})
    assert 0 < float((got - ref).abs().max()) <= LOGIT_BUDGET * float(ref.std())
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts: list[Any] = [
        {"prompt": text, "multi_modal_data": {"image": image}},
        "plain text",
        {"prompt": text, "multi_modal_data": {"image": random_image(30, 70, 4)}},
    ]
    together = [o.token_ids for o in q8.generate(prompts, params)]
    assert together == [q8.generate([p], params)[0].token_ids for p in prompts]
