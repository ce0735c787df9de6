"""Scheduler: admission, token budget, chunked prefill, continuous batching, preemption, abort,
prefix caching, and a seeded randomized run through a fake paged model against a sequential run."""

from __future__ import annotations

import random
from typing import Any

import pytest

from anyquant.engine.pages import PageAllocator
from anyquant.engine.request import Request, RequestStatus
from anyquant.engine.sampling import SamplingParams
from anyquant.engine.scheduler import Scheduler, SchedulerConfig, StepPlan

VOCAB = 50
EOS = 0


def next_token(tokens: list[int]) -> int:
    """The fake model: a deterministic function of the whole sequence (so a wrong KV read or a
    lost token changes everything after it)."""
    acc = 0
    for i, t in enumerate(tokens):
        acc = (acc * 1_000_003 + (i + 1) * (t + 7)) % 2_147_483_647
    return acc % VOCAB


def sequential(prompt: list[int], max_tokens: int, stop: set[int]) -> tuple[list[int], str]:
    """What a one-request-at-a-time loop produces, written independently of the scheduler."""
    tokens, out = list(prompt), []
    while True:
        t = next_token(tokens)
        if t in stop:
            return out, "stop"
        out.append(t)
        tokens.append(t)
        if len(out) == max_tokens:
            return out, "length"


class FakeRunner:
    """Plays the model runner: writes each fed token into its KV slot, reads the whole sequence back
    through the page table, and samples from what it read."""

    def __init__(self, alloc: PageAllocator, junk_for_chunks: bool = False) -> None:
        self.alloc = alloc
        self.kv: list[int | None] = [None] * (alloc.num_pages * alloc.page_size)
        self.junk_for_chunks = junk_for_chunks

    def slot(self, r: Request, pos: int) -> int:
        size = self.alloc.page_size
        return r.page_ids[pos // size] * size + pos % size

    def run(self, plan: StepPlan) -> dict[str, int | None]:
        sampled: dict[str, int | None] = {}
        for r, n in plan.scheduled:
            start = r.num_computed_tokens
            for pos in range(start, start + n):
                page = r.page_ids[pos // self.alloc.page_size]
                assert self.alloc.ref_count(page) == 1 and not self.alloc.is_cached(page), (
                    f"{r.request_id} writes position {pos} into shared or cached page {page}"
                )
                self.kv[self.slot(r, pos)] = r.all_token_ids[pos]
            seen = [self.kv[self.slot(r, pos)] for pos in range(start + n)]
            assert seen == r.all_token_ids[: start + n], f"{r.request_id}: KV cache holds wrong tokens"
            if r.reaches_end(n):
                sampled[r.request_id] = next_token(r.all_token_ids)
            else:
                sampled[r.request_id] = 7 if self.junk_for_chunks else None
        return sampled


def make(rid: str, prompt: list[int] | int, max_tokens: int = 4, eos: bool = False, **params: Any) -> Request:
    """A request; `eos` makes token EOS end it (off by default so hand-counted steps stay exact)."""
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    params = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, tokens, params, eos_token_ids=[EOS] if eos else [])


def build(num_pages: int = 64, page_size: int = 4, **config: Any) -> tuple[Scheduler, FakeRunner]:
    config.setdefault("max_model_len", 256)
    config.setdefault("max_num_seqs", 8)
    config.setdefault("max_num_batched_tokens", 256)
    alloc = PageAllocator(num_pages, page_size)
    return Scheduler(SchedulerConfig(**config), alloc), FakeRunner(alloc)


def step(s: Scheduler, runner: FakeRunner) -> tuple[StepPlan, list[Request]]:
    plan = s.schedule()
    return plan, s.update(plan, runner.run(plan))


def drain(s: Scheduler, runner: FakeRunner, limit: int = 10_000) -> list[StepPlan]:
    plans = []
    while s.has_work():
        plans.append(step(s, runner)[0])
        assert len(plans) < limit, "scheduler made no progress"
    return plans


def ids(plan: StepPlan) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in plan.scheduled]


# -- configuration and admission checks -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": 0}, "max_model_len"),
        (
            {"max_num_seqs": 8, "max_num_batched_tokens": 4},
            "max_num_batched_tokens=4 must be >= max_num_seqs=8",
        ),
        (
            {
                "enable_chunked_prefill": False,
                "max_num_seqs": 8,
                "max_num_batched_tokens": 64,
                "max_model_len": 128,
            },
            "chunked prefill",
        ),
    ],
)
def test_config_is_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)


def test_request_that_can_never_fit_max_model_len_is_rejected() -> None:
    s, _ = build(max_model_len=16)
    with pytest.raises(ValueError, match=r"prompt of 10 tokens \+ max_tokens=7 exceeds max_model_len=16"):
        s.add(make("a", 10, max_tokens=7))
    s.add(make("b", 10, max_tokens=6))
    with pytest.raises(ValueError, match="already in use"):
        s.add(make("b", 3))


def test_fifo_admission_under_the_sequence_budget() -> None:
    s, runner = build(max_num_seqs=2)
    for rid, mt in (("a", 1), ("b", 3), ("c", 1), ("d", 1)):
        s.add(make(rid, 3, max_tokens=mt))
    plan, done = step(s, runner)
    assert ids(plan) == [("a", 3), ("b", 3)]
    assert [r.request_id for r in done] == ["a"]
    plan, _ = step(s, runner)
    assert ids(plan) == [("b", 1), ("c", 3)]
    assert s.num_running == 1 and s.num_waiting == 1  # c finished (max_tokens=1), d waits
    plan, _ = step(s, runner)
    assert ids(plan) == [("b", 1), ("d", 3)]


def test_chunked_prefill_splits_a_long_prompt_across_steps() -> None:
    s, runner = build(max_num_batched_tokens=8)
    r = make("long", 20, max_tokens=2)
    s.add(r)
    chunks = []
    for _ in range(3):
        plan, _ = step(s, runner)
        chunks.append(ids(plan))
        if len(chunks) < 3:
            assert r.output_token_ids == []  # no sample before the prompt is complete
    assert chunks == [[("long", 8)], [("long", 8)], [("long", 4)]]
    assert len(r.output_token_ids) == 1
    plan, _ = step(s, runner)
    assert ids(plan) == [("long", 1)] and r.finish_reason == "length"


def test_chunk_takes_what_remains_of_the_budget() -> None:
    s, runner = build(max_num_batched_tokens=8)
    s.add(make("a", 5, max_tokens=3))
    s.add(make("b", 5, max_tokens=3))
    assert ids(step(s, runner)[0]) == [("a", 5), ("b", 3)]
    assert ids(step(s, runner)[0]) == [("a", 1), ("b", 2)]
    assert ids(step(s, runner)[0]) == [("a", 1), ("b", 1)]


def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it() -> None:
    s, runner = build(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    s.add(make("a", 20, max_tokens=3))
    s.add(make("b", [2] * 20, max_tokens=3))
    assert ids(step(s, runner)[0]) == [("a", 20)]
    assert ids(step(s, runner)[0]) == [("a", 1), ("b", 20)]


def test_decodes_come_first_and_prompts_take_the_rest() -> None:
    s, runner = build(max_num_batched_tokens=4, max_num_seqs=4)
    s.add(make("a", 2, max_tokens=5))
    step(s, runner)
    s.add(make("b", 10, max_tokens=5))
    assert ids(step(s, runner)[0]) == [("a", 1), ("b", 3)]
    assert ids(step(s, runner)[0]) == [("a", 1), ("b", 3)]


def test_continuous_batching_requests_join_and_leave_every_step() -> None:
    s, runner = build(max_num_seqs=8)
    arrivals = {0: [("a", 4, 3)], 1: [("b", 3, 1), ("c", 5, 4)], 2: [("d", 2, 2)], 4: [("e", 6, 1)]}
    membership: list[set[str]] = []
    finished_at: dict[str, int] = {}
    i = 0
    while s.has_work() or i in arrivals or i < max(arrivals):
        for rid, plen, mt in arrivals.get(i, []):
            s.add(make(rid, plen, max_tokens=mt))
        plan, done = step(s, runner)
        membership.append({r.request_id for r, _ in plan.scheduled})
        finished_at.update({r.request_id: i for r in done})
        i += 1
    assert membership == [{"a"}, {"a", "b", "c"}, {"a", "c", "d"}, {"c", "d"}, {"c", "e"}]
    assert finished_at == {"b": 1, "a": 2, "d": 3, "c": 4, "e": 4}


def test_outputs_match_a_sequential_run() -> None:
    s, runner = build(max_num_seqs=3, max_num_batched_tokens=6)
    reqs = [make(str(i), [i + 1] * (3 + i), max_tokens=5 + i, eos=True) for i in range(6)]
    for r in reqs:
        s.add(r)
    drain(s, runner)
    for r in reqs:
        assert (r.output_token_ids, r.finish_reason) == sequential(r.prompt_token_ids, r.max_tokens, {EOS})


# -- stopping ------------------------------------------------------------------------------------


def test_stop_tokens_finish_without_entering_the_output() -> None:
    prompt = [3, 1, 4]
    expected = sequential(prompt, 8, set())[0]
    stop = expected[2]
    s, runner = build()
    r = make("a", prompt, max_tokens=8, stop_token_ids=[stop])
    s.add(r)
    drain(s, runner)
    cut = expected.index(stop)
    assert r.output_token_ids == expected[:cut]
    assert r.finish_reason == "stop" and r.stop_token_id == stop
    assert s.allocator.num_used == 0


def test_eos_stops_unless_ignored() -> None:
    # A prompt whose first sampled token is eos under the fake model.
    prompt = next(
        p for p in ([a, b] for a in range(1, VOCAB) for b in range(1, VOCAB)) if next_token(p) == EOS
    )
    s, runner = build()
    stopped = make("s", prompt, max_tokens=3, eos=True)
    ignoring = make("i", prompt, max_tokens=3, eos=True, ignore_eos=True)
    s.add(stopped)
    s.add(ignoring)
    drain(s, runner)
    assert stopped.output_token_ids == [] and stopped.finish_reason == "stop"
    assert ignoring.output_token_ids[0] == EOS and ignoring.finish_reason == "length"
    assert len(ignoring.output_token_ids) == 3


# -- preemption and the KV budget ------------------------------------------------------------------


def test_preemption_under_a_tiny_page_budget_still_finishes_everything() -> None:
    # 6 pages of 4 tokens; each request grows to 5 + 10 - 1 = 14 computed tokens (4 pages).
    s, runner = build(num_pages=6, page_size=4, max_num_seqs=4)
    reqs = [make(str(i), [i + 1] * 5, max_tokens=10, ignore_eos=True) for i in range(4)]
    for r in reqs:
        s.add(r)
    first_preemption: tuple[list[str], list[str]] | None = None
    while s.has_work():
        running_before = [r.request_id for r in s.running]
        plan, _ = step(s, runner)
        if plan.preempted and first_preemption is None:
            first_preemption = (running_before, [r.request_id for r in plan.preempted])
            assert s.waiting[0] is plan.preempted[-1]  # back at the front of the queue
            assert plan.preempted[0].num_computed_tokens == 0 and not plan.preempted[0].page_ids
    assert first_preemption is not None
    running_before, victims = first_preemption
    # The victims are the most recently admitted requests, newest first.
    assert victims == running_before[::-1][: len(victims)]
    assert sum(r.num_preemptions for r in reqs) == s.num_preemptions > 0
    for r in reqs:
        assert len(r.output_token_ids) == 10 and r.finish_reason == "length"
        assert r.output_token_ids == sequential(r.prompt_token_ids, 10, set())[0]
    assert s.allocator.num_used == 0


def test_a_request_alone_that_outgrows_the_cache_fails_with_an_error() -> None:
    s, runner = build(num_pages=2, page_size=4)
    r = make("big", 5, max_tokens=10, ignore_eos=True)
    s.add(r)
    plans = drain(s, runner)
    assert r.finish_reason == "error"
    assert r.error is not None and "KV cache is too small" in r.error and "9 tokens need 3 pages" in r.error
    assert plans[-1].finished == [r] and plans[-1].is_empty
    # Positions 0..7 fit in 8 slots: prompt 5 + 4 sampled tokens, the 4th never fed.
    assert r.output_token_ids == sequential(r.prompt_token_ids, 4, set())[0]
    assert s.allocator.num_used == 0 and not s.has_work()


def test_a_prompt_larger_than_the_cache_fails_at_admission() -> None:
    s, runner = build(num_pages=2, page_size=4, max_num_batched_tokens=64, max_model_len=64)
    s.add(make("big", 9, max_tokens=1))
    s.add(make("small", 3, max_tokens=1))
    plan, _ = step(s, runner)
    assert [r.request_id for r in plan.finished] == ["big"] and ids(plan) == [("small", 3)]
    assert plan.finished[0].finish_reason == "error"


# -- abort and finish --------------------------------------------------------------------------------


def test_abort_frees_pages_of_running_and_waiting_requests() -> None:
    s, runner = build(max_num_seqs=1)
    a, b = make("a", 9, max_tokens=5), make("b", 3)
    s.add(a)
    s.add(b)
    step(s, runner)
    assert s.allocator.num_used == 3
    assert s.abort("a") is a
    assert a.finish_reason == "abort" and a.status is RequestStatus.FINISHED_ABORTED
    assert s.allocator.num_used == 0 and a.page_ids == []
    assert s.abort("b") is b and s.num_waiting == 0 and not s.has_work()
    assert s.abort("b") is None and s.abort("nope") is None


def test_abort_between_schedule_and_update_is_skipped() -> None:
    s, runner = build()
    a, b = make("a", 4), make("b", 4)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    sampled = runner.run(plan)
    s.abort("a")
    done = s.update(plan, sampled)
    assert done == [] and a.output_token_ids == [] and len(b.output_token_ids) == 1
    assert a.page_ids == [] and s.allocator.num_used == len(b.page_ids) == 1


def test_finish_from_outside_frees_pages() -> None:
    s, runner = build()
    a = make("a", 6, max_tokens=8)
    s.add(a)
    step(s, runner)
    assert s.finish("a", RequestStatus.FINISHED_STOPPED) is a
    assert a.finish_reason == "stop" and s.allocator.num_used == 0 and not s.has_work()


# -- prefix caching ------------------------------------------------------------------------------------


def test_prefix_cache_hit_skips_the_shared_prefix() -> None:
    s, runner = build(page_size=4)
    shared = list(range(10, 22))  # 12 tokens: 3 full pages
    first = make("first", [*shared, 1, 2], max_tokens=2)
    s.add(first)
    drain(s, runner)
    second = make("second", [*shared, 3], max_tokens=2, eos=True)
    s.add(second)
    plan, _ = step(s, runner)
    assert ids(plan) == [("second", 1)] and second.num_cached_tokens == 12
    assert s.num_prefix_hit_tokens == 12
    drain(s, runner)
    assert second.output_token_ids == sequential(second.prompt_token_ids, 2, {EOS})[0]


@pytest.mark.parametrize("length", [4, 8, 12, 13])
def test_prefix_cache_always_leaves_a_prompt_token_to_compute(length: int) -> None:
    s, runner = build(page_size=4)
    prompt = list(range(30, 30 + length))
    s.add(make("first", prompt, max_tokens=1))
    drain(s, runner)
    again = make("again", prompt, max_tokens=1)
    s.add(again)
    (entry,) = step(s, runner)[0].scheduled
    assert entry[1] == length - (length - 1) // 4 * 4 >= 1
    assert again.output_token_ids == sequential(prompt, 1, set())[0]


def test_prefix_caching_off_computes_everything() -> None:
    s, runner = build(enable_prefix_caching=False)
    s.add(make("a", 12, max_tokens=1))
    drain(s, runner)
    s.add(make("b", 12, max_tokens=1))
    assert ids(step(s, runner)[0]) == [("b", 12)]
    assert s.allocator.num_cached == 0


# -- contract misuse -------------------------------------------------------------------------------


def test_update_requires_tokens_and_the_current_plan() -> None:
    s, runner = build()
    s.add(make("a", 3))
    plan = s.schedule()
    with pytest.raises(RuntimeError, match="twice"):
        s.schedule()
    with pytest.raises(ValueError, match=r"\['a'\]"):
        s.update(plan, {"a": None})
    with pytest.raises(RuntimeError, match="last schedule"):
        s.update(StepPlan(), {})
    s.update(plan, runner.run(plan))
    a = s.get("a")
    assert a is not None and a.num_output_tokens == 1 and a.num_computed_tokens == 3


# -- randomized run --------------------------------------------------------------------------------


def check_pages(s: Scheduler) -> None:
    alloc = s.allocator
    holders = [r for r in s.running]
    free = alloc.free_page_ids()
    assert len(free) == len(set(free)) == alloc.num_free
    counts = [0] * alloc.num_pages
    for r in holders:
        assert len(r.page_ids) == len(set(r.page_ids))
        assert len(r.page_ids) >= alloc.pages_for(r.num_computed_tokens)
        for p in r.page_ids:
            counts[p] += 1
    for p in range(alloc.num_pages):
        assert alloc.ref_count(p) == counts[p]
        assert (p in free) == (counts[p] == 0)
    for r in s.waiting:
        assert r.page_ids == [] and r.num_computed_tokens == 0
    assert alloc.num_used + alloc.num_free == alloc.num_pages


def check_plan(
    s: Scheduler, plan: StepPlan, running_before: list[Request], waiting_before: list[Request]
) -> None:
    cfg = s.config
    seen = [r.request_id for r, _ in plan.scheduled]
    assert len(seen) == len(set(seen))
    assert plan.num_tokens <= cfg.max_num_batched_tokens
    assert len(plan.scheduled) <= cfg.max_num_seqs and s.num_running <= cfg.max_num_seqs
    for r, n in plan.scheduled:
        assert r.status is RequestStatus.RUNNING and 1 <= n <= r.num_uncomputed
        assert len(r.page_ids) * s.allocator.page_size >= r.num_computed_tokens + n
    # Decodes of requests already running come before anything else.
    kinds = [r in running_before and r.num_uncomputed == 1 for r, _ in plan.scheduled]
    assert kinds == sorted(kinds, reverse=True)
    # Admissions (and admission failures) are the head of the waiting queue, taken in order.
    admitted = [r for r, _ in plan.scheduled if r not in running_before]
    failed = [r for r in plan.finished if r in waiting_before]
    order = [waiting_before.index(r) for r in admitted]
    assert order == sorted(order)
    assert {id(r) for r in admitted + failed} == {
        id(r) for r in waiting_before[: len(admitted) + len(failed)]
    }
    if plan.preempted:
        assert not admitted
    if not cfg.enable_chunked_prefill:
        for r, n in plan.scheduled:
            assert n == r.num_uncomputed


@pytest.mark.parametrize("seed", range(40))
def test_random_workload_matches_sequential_runs(seed: int) -> None:
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 8])
    max_model_len = 48
    chunked = rng.random() < 0.7
    max_num_seqs = rng.randint(1, 6)
    budget = rng.randint(max(max_num_seqs, 4), 40) if chunked else rng.randint(max_model_len, 80)
    # Mostly enough pages for the longest request, sometimes not (then errors are allowed).
    slots = rng.choice([max_model_len, max_model_len + 16, 4 * max_model_len, max_model_len // 2])
    num_pages = max(1, slots // page_size)
    alloc = PageAllocator(num_pages, page_size)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=rng.random() < 0.7,
    )
    s = Scheduler(config, alloc)
    runner = FakeRunner(alloc, junk_for_chunks=rng.random() < 0.5)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    pending = []
    for i in range(rng.randint(5, 20)):
        base = rng.choice(prefixes)[: rng.randint(1, 20)]
        prompt = base + [rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 10))]
        max_tokens = rng.randint(1, max_model_len - len(prompt))
        stop = [rng.randrange(VOCAB)] if rng.random() < 0.3 else []
        request = make(f"r{i}", prompt, max_tokens=max_tokens, eos=True, stop_token_ids=stop)
        pending.append((rng.randint(0, 30), request))
    aborted: set[str] = set()
    for t in range(5000):
        for arrival, r in pending:
            if arrival == t:
                s.add(r)
        if not s.has_work() and t > 30:
            break
        running_before, waiting_before = list(s.running), list(s.waiting)
        plan = s.schedule()
        check_plan(s, plan, running_before, waiting_before)
        check_pages(s)
        sampled = runner.run(plan)
        if s.running and rng.random() < 0.02:
            victim = rng.choice(s.running)
            s.abort(victim.request_id)
            aborted.add(victim.request_id)
        s.update(plan, sampled)
        check_pages(s)
    else:
        pytest.fail("the workload did not finish")
    assert alloc.num_used == 0
    for _, r in pending:
        expected, reason = sequential(
            r.prompt_token_ids, r.max_tokens, {EOS, *r.sampling_params.stop_token_ids}
        )
        assert r.is_finished
        if r.request_id in aborted:
            assert r.finish_reason == "abort" and r.output_token_ids == expected[: r.num_output_tokens]
        elif r.finish_reason == "error":
            assert slots < max_model_len, "only a cache smaller than max_model_len may fail a request"
            assert r.output_token_ids == expected[: r.num_output_tokens]
            assert alloc.pages_for(r.num_tokens) > num_pages
        else:
            assert (r.output_token_ids, r.finish_reason) == (expected, reason)
