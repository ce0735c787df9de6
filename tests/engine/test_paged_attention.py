"""Paged attention read in place through block tables: against float64 math and transformers.

Covers decode rows and prefill chunks over a cached prefix in one step, pages shared between
sequences and scattered over the cache, GQA, sliding windows, and contexts of several thousand
tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.engine.engine import Engine, EngineConfig
from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.layers import attention
from anyquant.utils.tiny_model import write_tiny_model
from tests.helpers.attention_reference import causal_attention_float64

transformers = pytest.importorskip("transformers")


def _check(
    cache: PagedKVCache, sequences: list[tuple[list[int], int, int]], window: int | None
) -> PagedAttention:
    """Attend one step of `sequences` and compare every token's output with float64 math."""
    page, (hkv, d), h = cache.page_size, cache.k.shape[1::2], 6
    ctx = PagedAttention.for_sequences(cache, sequences)
    t = sum(n for _, _, n in sequences)
    q, k, v = torch.randn(t, h, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    out = ctx.attend(0, q, k, v, d**-0.5, window)
    at = 0
    for pages, cached, new in sequences:
        slots = torch.tensor([pages[p // page] * page + p % page for p in range(cached + new)])
        keys, values = cache.k[0][:, slots].transpose(0, 1), cache.v[0][:, slots].transpose(0, 1)
        assert torch.equal(keys[cached:], k[at : at + new])  # this step's keys were written in place
        want = causal_attention_float64(q[at : at + new], keys, values, cached + new, window)
        assert torch.allclose(out[at : at + new].double(), want, atol=1e-5), (pages, window)
        at += new
    return ctx


def _random_cache() -> PagedKVCache:
    torch.manual_seed(0)
    cache = PagedKVCache(1, 32, 4, 2, 8, 8, torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    return cache


@pytest.mark.parametrize("matmul_min_keys", [0, 1 << 30])  # decode through matmuls / through SDPA
@pytest.mark.parametrize("window", [None, 5, 23])
def test_mixed_step_matches_float64_attention(
    window: int | None, matmul_min_keys: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "MATMUL_DECODE_MIN_KEYS", matmul_min_keys)
    shared = [9, 3]  # a prefix two sequences share (8 tokens)
    # (pages, tokens already cached, new tokens): two decodes, a chunk over a shared prefix, a fresh prompt
    sequences = [
        ([5, 17, 2, 30, 11], 18, 1),
        ([*shared, 21, 7], 13, 1),
        ([*shared, 12, 25, 26], 8, 9),
        ([0, 1], 0, 6),
    ]
    ctx = _check(_random_cache(), sequences, window)
    decode = ctx.plan(window).decode
    assert decode is not None and (decode.bias is not None) == (matmul_min_keys == 0)


@pytest.mark.parametrize("new", [1, 5])
def test_one_sequence_on_consecutive_pages_is_read_in_place(new: int) -> None:
    ctx = _check(_random_cache(), [([6, 7, 8, 9], 14 - new, new)], None)
    group = ctx.plan(None).decode if new == 1 else ctx.plan(None).prefill
    assert group is not None and group.run == (24, 40)  # slots of pages 6-9: no gather
    scattered = _check(_random_cache(), [([6, 8, 7, 9], 14 - new, new)], None)
    group = scattered.plan(None).decode if new == 1 else scattered.plan(None).prefill
    assert group is not None and group.run is None


@pytest.mark.parametrize("pages", [[6, 2, 9, 30, 11, 4, 20, 8], [10, 11, 12, 13, 14, 15, 16, 17]])
@pytest.mark.parametrize("cached", [0, 1, 8, 10])
@pytest.mark.parametrize("window", [None, 7])
def test_one_prompt_chunk_attends_without_its_mask(pages: list[int], cached: int, window: int | None) -> None:
    """One sequence's chunk (> the C++ rows' limit of 4 x the group of 3) runs causally without the
    mask, after `cached` keys (a cached prefix, page-aligned or not) whose log-sum-exp merges with
    the new keys'; its keys past the context (the last page's padding) stay unseen. A window keeps
    the mask."""
    new = 21
    ctx = _check(_random_cache(), [(pages, cached, new)], window)
    group = ctx.plan(window).prefill
    assert group is not None and group.causal_prefix == (None if window else cached)


def _hf_choices(path: Path, prompt: list[int], generated: list[int]) -> list[int]:
    """The greedy token transformers picks at each generated position, teacher-forced on our
    sequence (one full forward: transformers' own cached decoding drifts on near-ties)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated[:-1]])).logits[0]
    return logits[len(prompt) - 1 :].argmax(-1).tolist()


@pytest.mark.slow
def test_long_context_with_a_shared_prefix_matches_transformers(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "long", "qwen2", seed=5, max_position_embeddings=8192)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (4200,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM(path, dtype="float32", max_model_len=4300, max_num_seqs=4)
    short = torch.randint(0, 256, (11,), generator=g).tolist()
    # Together with a short prompt of another length: the second long prompt hits the prefix cache.
    together = [o.token_ids for o in llm.generate(prompt_token_ids=[*prompts, short], sampling_params=params)]
    assert llm.engine.scheduler.num_prefix_hit_tokens >= 4096
    assert [_hf_choices(path, p, out) for p, out in zip(prompts, together)] == together[:2]
    alone = llm.generate(prompt_token_ids=[short], sampling_params=params)[0].token_ids
    assert together[2] == alone


SLIDING = {
    "mistral": {"sliding_window": 7},
    "qwen2": {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
}


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_sliding_window_matches_transformers(arch: str, tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / arch, arch, seed=2, **SLIDING[arch])
    ids = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(4)).tolist()
    llm = LLM(path, dtype="float32")
    windows = [layer.self_attn.sliding_window for layer in llm.model.model.layers]
    assert windows == ([7, 7] if arch == "mistral" else [None, 6])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = llm.logits(ids)
    assert float((ours - ref).norm() / ref.norm()) < 1e-5
    # The window matters: full attention would give other logits.
    for layer in llm.model.model.layers:
        layer.self_attn.sliding_window = None
    assert float((llm.logits(ids) - ref).norm() / ref.norm()) > 1e-3
    for layer, w in zip(llm.model.model.layers, windows):
        layer.self_attn.sliding_window = w
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    got = llm.generate(prompt_token_ids=[ids[:30], ids[:9]], sampling_params=params)
    for prompt, out in zip((ids[:30], ids[:9]), got):
        assert _hf_choices(path, prompt, out.token_ids) == out.token_ids


def test_greedy_tokens_do_not_depend_on_the_batch_under_chunked_prefill(tmp_path: Path) -> None:
    """fp32: each request's greedy tokens alone equal those in a batch of other lengths, whose
    prompts go through 24-token chunks mixed with other requests' decode rows (sliding window on)."""
    path = write_tiny_model(tmp_path / "m", "mistral", seed=9, sliding_window=7)
    llm = LLM(path, dtype="float32")
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 19, 45, 70)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]
    config = EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=24)
    engine = Engine(llm.model, None, config, torch.float32, torch.device("cpu"))
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    mixed_steps = 0
    while engine.has_unfinished():
        pending = [r.num_uncomputed for r in engine.scheduler.running]
        mixed_steps += any(n == 1 for n in pending) and any(n > 1 for n in pending)
        for delta in engine.step():
            tokens[delta.request_id] += delta.new_token_ids
    assert [tokens[rid] for rid in ids] == alone
    assert mixed_steps > 0  # some steps held decode rows and prefill chunks together
