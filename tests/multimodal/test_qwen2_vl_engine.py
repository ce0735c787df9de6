"""Images through `LLM.generate` (vLLM's prompt shape) on the engine: greedy tokens equal a
transformers greedy loop, the prefix cache never shares KV between different images behind the
same placeholder tokens, repeated images are encoded once, bad inputs get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.models.multimodal import ImageInputError
from anyquant.utils.tiny_vlm import write_tiny_vlm
from tests.helpers.images import QWEN2_VL_PLACEHOLDER, random_image
from tests.helpers.vlm_references import qwen2_vl_inputs

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    v25 = request.param == "qwen2.5-vl"
    return write_tiny_vlm(tmp_path_factory.mktemp(request.param), v25=v25, seed=11), v25


def reference_greedy(path: Path, v25: bool, ids: list[int], images: list[object], steps: int) -> list[int]:
    """transformers' forward from scratch at every step (positions recomputed each time)."""
    cls = (
        transformers.Qwen2_5_VLForConditionalGeneration
        if v25
        else transformers.Qwen2VLForConditionalGeneration
    )
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    seq = list(ids)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(**qwen2_vl_inputs(path, seq, images, prompt_len=len(ids))).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        seq.append(token)
    return out


def test_greedy_generation_with_images_equals_transformers(checkpoint: tuple[Path, bool]) -> None:
    path, v25 = checkpoint
    llm = LLM(path, dtype="float32")
    images = [random_image(100, 60, 1), random_image(50, 90, 2)]
    prompt = f"look {QWEN2_VL_PLACEHOLDER} and {QWEN2_VL_PLACEHOLDER} then"
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    # A text-only request in the same batch: mixed steps (1-D and M-RoPE positions) stay exact.
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}, "plain text"], params)
    expected = reference_greedy(path, v25, outs[0].prompt_token_ids, images, 6)
    assert outs[0].token_ids == expected
    alone = llm.generate("plain text", params)[0]
    assert outs[1].token_ids == alone.token_ids


def test_prefix_cache_keys_include_the_image(checkpoint: tuple[Path, bool]) -> None:
    path, _ = checkpoint
    llm = LLM(path, dtype="float32")
    a, b = random_image(112, 112, 3), random_image(112, 112, 4)  # same size: identical placeholder ids
    prompt = "x" * 20 + QWEN2_VL_PLACEHOLDER + "describe it " * 3
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    first_a = llm.generate({"prompt": prompt, "multi_modal_data": {"image": a}}, params)[0]
    scheduler = llm.engine.scheduler
    hits = scheduler.num_prefix_hit_tokens
    on_b = llm.generate({"prompt": prompt, "multi_modal_data": {"image": b}}, params)[0]
    # Only the text pages before the image may be shared (here: one page of 16 tokens).
    assert scheduler.num_prefix_hit_tokens - hits <= 16
    fresh_b = LLM(path, dtype="float32").generate(
        {"prompt": prompt, "multi_modal_data": {"image": b}}, params
    )[0]
    assert on_b.token_ids == fresh_b.token_ids
    assert on_b.logprobs == fresh_b.logprobs
    hits = scheduler.num_prefix_hit_tokens
    again_a = llm.generate({"prompt": prompt, "multi_modal_data": {"image": a}}, params)[0]
    assert scheduler.num_prefix_hit_tokens - hits >= 32  # the image's pages are reused
    assert again_a.token_ids == first_a.token_ids
    cache = llm.engine.runner.encoder_cache
    assert cache is not None and cache.num_encoded == 2  # a once, b once


def test_logits_api_with_image_match_generation_logprobs(checkpoint: tuple[Path, bool]) -> None:
    path, _ = checkpoint
    llm = LLM(path, dtype="float32")
    image = random_image(80, 80, 5)
    out = llm.generate(
        {"prompt": f"a {QWEN2_VL_PLACEHOLDER} b", "multi_modal_data": {"image": image}},
        SamplingParams(max_tokens=1, temperature=0.0, logprobs=0),
    )[0]
    logits = llm.logits(llm.tokenizer.encode(f"a {QWEN2_VL_PLACEHOLDER} b"), {"image": image})
    expected = torch.log_softmax(logits[-1], dim=-1)[out.token_ids[0]]
    assert out.logprobs is not None
    assert abs(out.logprobs[0][out.token_ids[0]] - float(expected)) < 1e-4


def test_bad_image_inputs_are_refused_clearly(checkpoint: tuple[Path, bool], tmp_path: Path) -> None:
    path, _ = checkpoint
    llm = LLM(path, dtype="float32")
    image = random_image(64, 64, 6)
    with pytest.raises(ImageInputError, match="1 image placeholder"):
        llm.generate({"prompt": f"{QWEN2_VL_PLACEHOLDER}", "multi_modal_data": {"image": [image, image]}})
    with pytest.raises(ImageInputError, match="PIL"):
        llm.generate({"prompt": f"{QWEN2_VL_PLACEHOLDER}", "multi_modal_data": {"image": b"not an image"}})
    with pytest.raises(ImageInputError, match="only 'image'"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"video": image}})


def test_text_model_refuses_images(tmp_path: Path) -> None:
    from anyquant.utils.tiny_model import write_tiny_model

    llm = LLM(write_tiny_model(tmp_path / "llama"), dtype="float32")
    with pytest.raises(ImageInputError, match="takes no images"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"image": random_image(8, 8, 0)}})


def test_chunked_prefill_cutting_images_equals_one_chunk(checkpoint: tuple[Path, bool]) -> None:
    """Prefill chunks of 3 tokens cut both images (and their M-RoPE positions) mid-way."""
    from anyquant.engine.engine import Engine, EngineConfig

    path, _ = checkpoint
    llm = LLM(path, dtype="float32")
    assert llm.tokenizer is not None
    images = [random_image(90, 60, 7), random_image(60, 60, 8)]
    ids, mm = llm.prepare_multimodal(
        llm.tokenizer.encode(f"q {QWEN2_VL_PLACEHOLDER}{QWEN2_VL_PLACEHOLDER} a"), {"image": images}
    )
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    want = llm.generate({"prompt_token_ids": ids, "multi_modal_data": None}, params)  # text-only baseline
    config = EngineConfig(max_model_len=256, max_num_seqs=2, max_num_batched_tokens=3)
    engine = Engine(llm.model, llm.tokenizer, config, torch.float32, llm.device)
    rid = engine.add_request(ids, params, multimodal=mm)
    tokens: list[int] = []
    logprobs: list[dict[int, float]] = []
    steps = 0
    while engine.has_unfinished():
        for delta in engine.step():
            assert delta.request_id == rid
            tokens += delta.new_token_ids
            logprobs += delta.logprobs
        steps += 1
    assert steps >= len(ids) // 3  # the prompt really went in small chunks
    whole = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, params)[0]
    assert tokens == whole.token_ids
    assert whole.logprobs is not None
    for step, (got, ref) in enumerate(zip(logprobs, whole.logprobs, strict=True)):
        assert abs(got[tokens[step]] - ref[tokens[step]]) < 1e-4
    assert want[0].token_ids != whole.token_ids or want[0].logprobs != whole.logprobs  # images mattered
