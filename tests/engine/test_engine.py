"""The engine behind LLM.generate: continuous batching, paged KV cache, preemption, isolation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.engine import engine as engine_module
from anyquant.engine.engine import EngineConfig, kv_pages
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.errors import AnyquantError, EngineDeadError, NumericsError
from anyquant.utils.tiny_model import write_tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("engine"), "llama", seed=11)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _alone(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [llm.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]


def test_batch_composition_does_not_change_greedy_output(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32")
    prompts = _prompts(12)
    together = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
    assert together == _alone(llm, prompts, GREEDY)
    assert all(len(t) == GREEDY.max_tokens for t in together)


def test_batched_generation_matches_teacher_forced_logits(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32")
    prompt = _prompts(1, seed=3)[0]
    out = llm.generate(prompt_token_ids=[prompt, *_prompts(3, seed=4)], sampling_params=GREEDY)[0].token_ids
    logits = llm.logits(prompt + out[:-1])
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == out


def test_preemption_under_a_tiny_kv_budget_completes_every_request(tiny: Path) -> None:
    roomy = LLM(tiny, dtype="float32")
    prompts = _prompts(10, seed=5)
    expected = _alone(roomy, prompts, GREEDY)
    # 6 pages of 16 tokens for 10 requests of up to 63 tokens: requests must be preempted and recomputed.
    tight = LLM(tiny, dtype="float32", kv_cache_gb=6 * _page_bytes(roomy) / 2**30)
    assert tight.engine.allocator.num_pages == 6
    outs = tight.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.allocator.num_used == 0


def _page_bytes(llm: LLM) -> int:
    shape = llm.model.cache_shape
    return PagedKVCache.bytes_per_page(
        llm.model.args.num_layers, 16, shape.num_kv_heads, shape.k_dim, shape.v_dim, torch.float32
    )


def test_abort_frees_pages(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32")
    engine = llm.engine
    rids = [engine.add_request(p, GREEDY) for p in _prompts(4, seed=6)]
    engine.step()
    engine.step()
    assert engine.allocator.num_used > 0
    for rid in rids:
        engine.abort(rid)
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def test_stop_strings_and_stop_tokens(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32")
    prompt = _prompts(1, seed=7)[0]
    free = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    stop_token = free.token_ids[5]
    out = llm.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(
            max_tokens=24, temperature=0, stop_token_ids=[stop_token], ignore_eos=True
        ),
    )[0]
    assert out.finish_reason == "stop" and stop_token not in out.token_ids
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_token)]
    text = free.text
    stop = text[3:6] if len(text) > 6 else None
    if stop:
        out = llm.generate(
            prompt_token_ids=[prompt],
            sampling_params=SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True),
        )[0]
        assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32")
    prompt = _prompts(1, seed=8)[0]

    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return llm.generate(prompt_token_ids=[prompt, *_prompts(2, seed=9)], sampling_params=params)[
            0
        ].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_failing_request_fails_alone(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(tiny, dtype="float32")
    engine = llm.engine
    bad = engine.add_request([1, 2, 3], GREEDY)
    good = engine.add_request([4, 5, 6], GREEDY)
    execute = engine.runner.execute

    def poisoned(plan):  # type: ignore[no-untyped-def]
        out = execute(plan)
        if bad in out.request_ids:
            out.logits = out.logits.clone()  # inference tensors are read-only outside inference mode
            out.logits[out.request_ids.index(bad)] = float("nan")
        return out

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    finished = {}
    while engine.has_unfinished():
        for d in engine.step():
            if d.finished:
                finished[d.request_id] = d
    assert finished[bad].finish_reason == "error" and "non-finite logits" in (finished[bad].error or "")
    assert finished[good].finish_reason == "length"
    assert engine.num_nonfinite_events == 1
    assert engine.allocator.num_used == 0


def test_a_forward_pass_that_raises_fails_only_the_request_at_fault(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(tiny, dtype="float32")
    prompts = _prompts(3, seed=21)
    expected = _alone(llm, prompts, GREEDY)
    poison = [7, 7, 7, 7, 7]
    engine = llm.engine
    execute = engine.runner.execute
    batch_sizes_that_raised: list[int] = []

    def explode_on_poison(plan):  # type: ignore[no-untyped-def]
        if any(r.prompt_token_ids == poison for r, _ in plan.scheduled):
            batch_sizes_that_raised.append(len(plan.scheduled))
            raise RuntimeError("kernel exploded")
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", explode_on_poison)
    ids = [engine.add_request(p, GREEDY) for p in (prompts[0], poison, *prompts[1:])]
    finished, tokens = {}, {rid: [] for rid in ids}
    while engine.has_unfinished():
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
            if d.finished:
                finished[d.request_id] = d
    # The poisoned prompt shared its first step with the three others, and only it failed.
    assert batch_sizes_that_raised[0] == 4
    bad = finished[ids[1]]
    assert bad.finish_reason == "error" and "kernel exploded" in (bad.error or "")
    assert [tokens[rid] for rid in ids[:1] + ids[2:]] == expected
    assert all(finished[rid].finish_reason == "length" for rid in ids[:1] + ids[2:])
    assert engine.num_step_failures == 1 and engine.allocator.num_used == 0


def test_an_engine_level_failure_is_not_retried_and_leaves_the_scheduler_consistent(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(tiny, dtype="float32")
    engine = llm.engine
    calls = []

    def dead(plan):  # type: ignore[no-untyped-def]
        calls.append(len(plan.scheduled))
        raise EngineDeadError("tensor-parallel rank 1 (pid 1) was killed by signal SIGKILL")

    monkeypatch.setattr(engine.runner, "execute", dead)
    for p in _prompts(2, seed=31):
        engine.add_request(p, GREEDY)
    with pytest.raises(EngineDeadError, match="rank 1"):
        engine.step()
    assert calls == [2]  # not re-run request by request: no request is to blame
    assert engine.scheduler.open_plan is None and engine.allocator.num_used == 0
    assert not engine.has_unfinished()


def test_generate_raises_on_nonfinite(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(tiny, dtype="float32")
    execute = llm.engine.runner.execute

    def poisoned(plan):  # type: ignore[no-untyped-def]
        out = execute(plan)
        out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(llm.engine.runner, "execute", poisoned)
    with pytest.raises(NumericsError, match="non-finite logits"):
        llm.generate(prompt_token_ids=[[1, 2]], sampling_params=GREEDY)


def test_engine_config_validation() -> None:
    with pytest.raises(ValueError, match="power of two"):
        EngineConfig(max_model_len=64, page_size=12)
    with pytest.raises(ValueError, match="kv_cache_gb"):
        EngineConfig(max_model_len=64, kv_cache_gb=0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"kv_cache_fraction must be in \(0, 1\]"):
            EngineConfig(max_model_len=64, kv_cache_fraction=bad)
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(max_model_len=64, kv_cache_gb=1, kv_cache_fraction=0.5)


def test_kv_cache_fraction_takes_that_share_of_free_memory_up_to_what_is_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = 1000  # bytes per page
    config = EngineConfig(max_model_len=64, max_num_seqs=4, page_size=16, kv_cache_fraction=0.5)
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: 10 * page)
    assert kv_pages(config, page) == 5  # half of 10 free pages
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda device: 10**6 * page)
    assert kv_pages(config, page) == 4 * 64 // 16  # capped: 4 full-length sequences of 4 pages


def test_free_memory_on_cpu_is_positive_and_below_physical_memory() -> None:
    free = engine_module.available_memory_bytes(torch.device("cpu"))
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_prompt_ids_outside_the_vocabulary_are_named_before_any_forward_pass(tiny: Path) -> None:
    llm = LLM(tiny, dtype="float32")
    vocab = llm.engine.vocab_size
    with pytest.raises(AnyquantError, match=f"prompt token id {vocab} is outside the vocabulary"):
        llm.logits([1, vocab])
    with pytest.raises(AnyquantError, match=f"prompt token id {vocab + 5} is outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, vocab + 5]], sampling_params=SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()
    assert llm.logits([vocab - 1]).shape == (1, vocab)


def test_freed_heap_is_returned_after_large_steps_only(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill step's freed activations go back to the OS (glibc keeps them resident otherwise);
    decode steps and small prompts do not pay for a trim."""
    trims: list[int] = []
    monkeypatch.setattr(engine_module, "return_freed_memory", lambda: trims.append(1))
    llm = LLM(tiny, dtype="float32")
    few = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=[[5] * 20], sampling_params=few)
    assert trims == []
    half = engine_module.TRIM_AFTER_TOKENS // 2  # two prompts prefilled in one step
    llm.generate(prompt_token_ids=[[6] * half, [7] * half], sampling_params=few)  # no cached prefix
    assert trims == [1]  # the prefill step, not the two decode steps after it
