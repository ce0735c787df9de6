"""Llama-3.2-Vision on the engine: greedy tokens with images (cross-attention keys and values built
once per request and reused by every decode step) equal transformers' own `generate`, in a batch
with a text-only request; chunked prefill and preemption under a tiny KV budget change nothing;
the prefix cache never shares pages between prompts with different images; the per-request state
is freed once the request finished; LLM.chat and the OpenAI server take image parts."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.server import ServerConfig, create_app
from anyquant.utils.tiny_mllama import IMAGE, write_tiny_mllama
from tests.helpers.vlm_references import mllama_inputs
from tests.server.conftest import call

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
processing = pytest.importorskip("transformers.models.mllama.processing_mllama")

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def random_image(width: int, height: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mllama(tmp_path_factory.mktemp("mllama-engine"), seed=13)


@pytest.fixture(scope="module")
def llm(path: Path) -> LLM:
    return LLM(path, dtype="float32", max_model_len=256)


def reference_generate(path: Path, ids: list[int], images: list[Any], steps: int) -> list[int]:
    """transformers' generate: its own cache of the cross-attention keys and values."""
    model = transformers.MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            **mllama_inputs(path, ids, images), max_new_tokens=steps, do_sample=False, min_new_tokens=steps
        )
    return out[0, len(ids) :].tolist()


def test_greedy_generation_equals_transformers(llm: LLM, path: Path) -> None:
    images = [random_image(100, 40, 1), random_image(30, 90, 2)]
    two = {"prompt": "look <|image|> and<|image|> then", "multi_modal_data": {"image": images}}
    one = {"prompt": "a <|image|>b", "multi_modal_data": {"image": images[1]}}
    outs = llm.generate([two, "plain text", one], GREEDY)
    assert outs[0].token_ids == reference_generate(path, outs[0].prompt_token_ids, images, 6)
    assert outs[1].token_ids == reference_generate(path, outs[1].prompt_token_ids, [], 6)
    assert outs[2].token_ids == reference_generate(path, outs[2].prompt_token_ids, images[1:], 6)
    assert outs[0].prompt_token_ids.count(IMAGE) == 2  # one token per image


def _page_bytes(llm: LLM) -> int:
    shape = llm.model.cache_shape
    return PagedKVCache.bytes_per_page(
        llm.model.args.num_layers, 16, shape.num_kv_heads, shape.k_dim, shape.v_dim, torch.float32
    )


def test_chunked_prefill_and_preemption_change_nothing(llm: LLM) -> None:
    from anyquant.engine.engine import Engine, EngineConfig

    assert llm.tokenizer is not None
    prompts = []
    for i in range(4):
        ids, mm = llm.prepare_multimodal(
            llm.tokenizer.encode("x" * (10 + 7 * i) + "<|image|> what?"),
            {"image": random_image(40 + 20 * i, 50, i)},
        )
        prompts.append((ids, mm))
    # 4 pages of 16 tokens for 4 requests of 25..60 tokens, prefill chunks of 8 tokens: requests
    # are preempted and recomputed, reusing their kept cross-attention state.
    config = EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=8,
                          kv_cache_gb=4 * _page_bytes(llm) / 2**30)  # fmt: skip
    engine = Engine(llm.model, llm.tokenizer, config, torch.float32, llm.device)
    assert engine.allocator.num_pages == 4
    rids = [engine.add_request(ids, GREEDY, multimodal=mm) for ids, mm in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.new_token_ids
    assert engine.scheduler.num_preemptions > 0
    for rid, (ids, mm) in zip(rids, prompts):
        alone = Engine(llm.model, llm.tokenizer, EngineConfig(max_model_len=256), torch.float32, llm.device)
        one = alone.add_request(ids, GREEDY, multimodal=mm)
        want: list[int] = []
        while alone.has_unfinished():
            want += [t for d in alone.step() if d.request_id == one for t in d.new_token_ids]
        assert tokens[rid] == want
    states = engine.runner.model.cross_states
    keys = engine.runner.cross_requests.keys
    # Requests that finished before the last step were released by a later one; the last ones
    # are released with the next step.
    assert keys and all(k in states for k in keys)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    assert len(engine.runner.cross_requests) == 0
    assert not any(k in states for k in keys)


def test_prefix_cache_keys_include_every_image(llm: LLM, path: Path) -> None:
    a, b = random_image(64, 64, 3), random_image(64, 64, 4)
    prompt = "same text before the image, long enough for pages " + "<|image|>" + " describe it" * 3
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    first_a = llm.generate({"prompt": prompt, "multi_modal_data": {"image": a}}, params)[0]
    scheduler = llm.engine.scheduler
    hits = scheduler.num_prefix_hit_tokens
    on_b = llm.generate({"prompt": prompt, "multi_modal_data": {"image": b}}, params)[0]
    # The text before the image attends the image too (a full-row-masked row sees every key).
    assert scheduler.num_prefix_hit_tokens == hits
    fresh_b = LLM(path, dtype="float32", max_model_len=256).generate(
        {"prompt": prompt, "multi_modal_data": {"image": b}}, params
    )[0]
    assert (on_b.token_ids, on_b.logprobs) == (fresh_b.token_ids, fresh_b.logprobs)
    again_a = llm.generate({"prompt": prompt, "multi_modal_data": {"image": a}}, params)[0]
    assert scheduler.num_prefix_hit_tokens - hits >= 32
    assert again_a.token_ids == first_a.token_ids
    assert again_a.logprobs is not None and first_a.logprobs is not None
    for got, want in zip(again_a.logprobs, first_a.logprobs, strict=True):
        assert all(abs(got[t] - want[t]) < 1e-5 for t in want)


def test_logits_api_matches_generation_logprobs(llm: LLM) -> None:
    image = random_image(80, 50, 5)
    prompt = "a <|image|> b"
    out = llm.generate(
        {"prompt": prompt, "multi_modal_data": {"image": image}},
        SamplingParams(max_tokens=1, temperature=0.0, logprobs=0),
    )[0]
    assert llm.tokenizer is not None and out.logprobs is not None
    logits = llm.logits(llm.tokenizer.encode(prompt), {"image": image})
    expected = torch.log_softmax(logits[-1], dim=-1)[out.token_ids[0]]
    assert abs(out.logprobs[0][out.token_ids[0]] - float(expected)) < 1e-4


def png_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_and_server_take_image_parts(llm: LLM) -> None:
    image = random_image(70, 40, 6)
    content = [
        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
        {"type": "text", "text": "What?"},
    ]
    messages = [{"role": "user", "content": content}]
    assert llm.tokenizer is not None
    rendered = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    )
    ids = llm.tokenizer.encode(rendered, False)
    assert ids.count(IMAGE) == 1
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    expected = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": image}}, params)[0]
    assert llm.chat(messages, params)[0].token_ids == expected.token_ids
    app = create_app(llm.engine, llm.tokenizer, ServerConfig("mllama"), llm.image_processor())
    try:
        body = {"messages": messages, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True}
        response = call(app, "POST", "/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected.text
    finally:
        app.state.server.engine.close()


def test_image_count_must_match_the_image_tokens(llm: LLM) -> None:
    from anyquant.models.multimodal import ImageInputError

    image = random_image(40, 40, 9)
    with pytest.raises(ImageInputError, match=r"0 image token\(s\) \(272\) but 1 image"):
        llm.generate({"prompt": "no image token here", "multi_modal_data": {"image": image}})
    with pytest.raises(ImageInputError, match=r"2 image token\(s\) \(272\) but 1 image"):
        llm.generate({"prompt": "<|image|><|image|>", "multi_modal_data": {"image": [image]}})


def test_bfloat16_runs_close_to_float32(llm: LLM, path: Path) -> None:
    """The 16-bit paths (matrix-vector kernels, bf16 cross-attention keys and values) run."""
    image = random_image(60, 45, 10)
    assert llm.tokenizer is not None
    ids = llm.tokenizer.encode("a <|image|> b c")
    half = LLM(path, dtype="bfloat16", max_model_len=256)
    want = llm.logits(ids, {"image": image})
    got = half.logits(ids, {"image": image})
    assert float((got - want).norm() / want.norm()) < 0.05
    out = half.generate({"prompt": "a <|image|> b c", "multi_modal_data": {"image": image}}, GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens
