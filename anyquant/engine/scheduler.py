"""Continuous-batching scheduler: which requests run in the next forward pass, with how many tokens.

Owns the waiting queue, the running set, admission, chunked prefill, preemption (by recompute) and
the bookkeeping after a step (computed counts, appended tokens, finishing, freeing pages). Its only
output is a `StepPlan`; it creates no tensors and never sees logits, only the sampled token ids.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from anyquant.engine.pages import PageAllocator
from anyquant.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (the token budget)
    max_model_len: int = 2048  # prompt + output tokens of one request
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise a full batch of decodes (one token each) could not run in one step.
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                f"max_num_seqs={self.max_num_seqs}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens="
                f"{self.max_num_batched_tokens} must be >= max_model_len={self.max_model_len}; "
                "raise it or enable chunked prefill"
            )


@dataclass
class StepPlan:
    """One step. `scheduled` pairs each request with the number of its next uncomputed tokens to
    feed, decodes first, then prefill chunks of running requests, then newly admitted requests.
    `preempted`: requests that lost their pages this step (back in the waiting queue).
    `finished`: requests the scheduler finished while planning (KV cache too small for them)."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class _Draft:
    """A plan being built: scheduled entries by request id (removable when a victim is preempted)."""

    budget: int
    scheduled: dict[str, tuple[Request, int]] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


class Scheduler:
    """Not thread-safe: call `add`, `abort`, `finish`, `schedule` and `update` from one loop, and
    call `update` once after every `schedule` before the next `schedule`."""

    def __init__(self, config: SchedulerConfig, allocator: PageAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is the newest
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._num_arrived = 0
        self._outstanding: StepPlan | None = None
        self.num_preemptions = 0  # totals, for metrics
        self.num_prefix_hit_tokens = 0

    # -- queue ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        limit = self.config.max_model_len
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens + request.max_tokens > limit:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {request.num_prompt_tokens} tokens + "
                f"max_tokens={request.max_tokens} exceeds max_model_len={limit}; shorten the prompt "
                f"or lower max_tokens to at most {max(limit - request.num_prompt_tokens, 0)}"
            )
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.page_ids:
            raise ValueError(f"request {request.request_id!r} was already scheduled once")
        request.arrival = self._num_arrived
        self._num_arrived += 1
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> Request | None:
        """Finish an unfinished request as aborted and free its pages; None if it is unknown or
        already finished."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus, error: str | None = None) -> Request | None:
        """Finish a request from outside the scheduler (stop string, client gone, non-finite logits)
        and free its pages. None if it is unknown or already finished."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self._retire(request, status, error)
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def kv_usage(self) -> float:
        return self.allocator.usage()

    # -- planning ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        if self._outstanding is not None:
            raise RuntimeError("schedule() called twice without update() for the previous plan")
        draft = _Draft(budget=self.config.max_num_batched_tokens)
        # Decodes first (one token each, cheap and latency-critical), then the prompt chunks of
        # requests already running, oldest first.
        for decoding in (True, False):
            for request in list(self.running):
                if request.status is RequestStatus.RUNNING and (request.num_uncomputed == 1) == decoding:
                    self._schedule_running(request, draft)
        # Admitting right after a preemption would only thrash: memory is short this step.
        if not draft.preempted:
            self._admit(draft)
        plan = StepPlan(list(draft.scheduled.values()), draft.preempted, draft.finished)
        self._outstanding = plan
        return plan

    def _schedule_running(self, request: Request, draft: _Draft) -> None:
        num_new = min(request.num_uncomputed, draft.budget)
        if num_new < 1:
            return
        if self._reserve(request, request.num_computed_tokens + num_new, draft):
            draft.scheduled[request.request_id] = (request, num_new)
            draft.budget -= num_new

    def _reserve(self, request: Request, total: int, draft: _Draft) -> bool:
        """Pages for `total` tokens of a running request, preempting the newest running requests
        until they fit. False when `request` itself was preempted or failed."""
        while not self.allocator.allocate(request, total):
            if len(self.running) == 1:
                self._fail_too_small(request, total, draft)
                return False
            victim = self.running[-1]
            self._preempt(victim, draft)
            if victim is request:
                return False
        return True

    def _admit(self, draft: _Draft) -> None:
        """Admit waiting requests FIFO while the token budget, the sequence budget and pages allow."""
        while self.waiting and draft.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix: list[int] = []
            num_cached = 0
            if self.config.enable_prefix_caching:
                prefix, num_cached = self.allocator.match_prefix(request.cache_key_ids)
            num_new = request.num_tokens - num_cached
            if num_new > draft.budget:
                if not self.config.enable_chunked_prefill:
                    return  # the head of the queue waits for a step with room for its whole prompt
                num_new = draft.budget
            if not self.allocator.allocate(request, num_cached + num_new, prefix):
                if self.running:
                    return  # pages come back as running requests finish
                # Nothing holds a page, so it can never fit.
                self.waiting.popleft()
                self._fail_too_small(request, num_cached + num_new, draft)
                continue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            self.num_prefix_hit_tokens += num_cached
            self.running.append(request)
            draft.scheduled[request.request_id] = (request, num_new)
            draft.budget -= num_new

    def _preempt(self, request: Request, draft: _Draft) -> None:
        # Recompute later: drop its K/V, keep its tokens, and let it go first once pages return.
        self.running.remove(request)
        self.allocator.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        draft.preempted.append(request)
        # Defensive: victims are the newest requests, which this step's order has not reached yet;
        # should a future order schedule them earlier, their tokens go back to the budget.
        entry = draft.scheduled.pop(request.request_id, None)
        if entry is not None:
            draft.budget += entry[1]

    def _fail_too_small(self, request: Request, total: int, draft: _Draft) -> None:
        allocator = self.allocator
        message = (
            f"the KV cache is too small for request {request.request_id!r}: {total} tokens need "
            f"{allocator.pages_for(total)} pages of {allocator.page_size} tokens but the cache has "
            f"{allocator.num_pages} pages; give the KV cache more memory or lower max_model_len / max_tokens"
        )
        self._retire(request, RequestStatus.FINISHED_ERROR, message)
        draft.finished.append(request)

    @property
    def open_plan(self) -> StepPlan | None:
        """The plan the last `schedule()` returned, until `update()` or `abandon()` closes it."""
        return self._outstanding

    def abandon(self, plan: StepPlan, error: str) -> list[Request]:
        """Close a plan whose step broke before `update()` could record it: its requests that are
        still unfinished fail with `error` (their pages are freed); the waiting queue is untouched.
        Returns the requests failed here."""
        if plan is not self._outstanding:
            raise RuntimeError("abandon() must be given the plan returned by the last schedule()")
        self._outstanding = None
        failed = [r for r, _ in plan.scheduled if r.request_id in self._requests]
        for request in failed:
            self._retire(request, RequestStatus.FINISHED_ERROR, error)
        return failed

    # -- after the model ran -------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: dict[str, int | None]) -> list[Request]:
        """Record what the step computed. `sampled` maps request ids to the token sampled from the
        logits of their last scheduled row; it is read only for requests whose scheduled tokens
        reached their end (`Request.reaches_end`), others may be missing or None. Returns the
        requests that finished in this update (their pages are freed)."""
        if plan is not self._outstanding:
            raise RuntimeError("update() must be given the plan returned by the last schedule()")
        # Finished or aborted after planning: nothing to record, their pages are already freed.
        live = [(r, n) for r, n in plan.scheduled if r.status is RequestStatus.RUNNING]
        missing = [r.request_id for r, n in live if r.reaches_end(n) and sampled.get(r.request_id) is None]
        if missing:
            raise ValueError(
                f"update(): requests {missing} computed all their tokens this step but no sampled "
                "token was given for them"
            )
        self._outstanding = None
        finished: list[Request] = []
        for request, num_new in live:
            request.num_computed_tokens += num_new
            if self.config.enable_prefix_caching:
                self.allocator.cache_full_pages(request)
            token = sampled.get(request.request_id)
            if request.num_uncomputed > 0 or token is None:
                continue  # a prompt chunk: no token to sample yet
            status = self._append(request, token)
            if status is not None:
                self._retire(request, status)
                finished.append(request)
        return finished

    def _append(self, request: Request, token: int) -> RequestStatus | None:
        """Append one sampled token; the finished status it causes, if any."""
        if request.is_stop_token(token):
            request.stop_token_id = token  # like eos, never part of the output
            return RequestStatus.FINISHED_STOPPED
        request.append_token(token)
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _retire(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.allocator.free(request)
        request.finish(status, error)
        self._requests.pop(request.request_id, None)
