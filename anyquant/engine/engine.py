"""Engine: requests in, tokens and text out, one `step()` at a time (plan -> run -> sample -> update).

Owns the request registry, per-request sampling state (seeded generators, detokenizers), the
non-finite-logits guard and the isolation of a forward pass that raises: both fail only the
request at fault, never the others sharing its step. Scheduling policy
lives in scheduler.py, tensors in runner.py; the same engine serves `LLM.generate` and the server.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anyquant.engine.detokenizer import IncrementalDetokenizer
from anyquant.engine.grammar import GrammarCompiler
from anyquant.engine.guided import GuidedDecoder, StepMasks
from anyquant.engine.kv_cache import PagedKVCache
from anyquant.engine.multimodal import MultimodalPrompt
from anyquant.engine.numerics import finite_rows_and_argmax
from anyquant.engine.pages import PageAllocator
from anyquant.engine.penalties import PenaltyTracker
from anyquant.engine.request import Request, RequestStatus
from anyquant.engine.runner import ModelRunner, StepLogits
from anyquant.engine.sampling import SamplingParams, apply_logit_processing, sample
from anyquant.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from anyquant.engine.scoring import prompt_logits
from anyquant.errors import EngineDeadError
from anyquant.layers.kv_quant import KV_CACHE_DTYPES, cache_dtype
from anyquant.loading.dtype_policy import overflow_advice
from anyquant.tokenizer import Tokenizer
from anyquant.utils.memory import return_freed_memory

log = logging.getLogger(__name__)

# After a step of at least this many tokens the heap's free pages go back to the OS. A prefill
# chunk's activations (hundreds of MiB at 2048 tokens) are freed into glibc's heap, which keeps
# them resident: serving 32 clients held ~650 MiB more than serving one (benchmarks/RESULTS.md,
# MoE memory). Below this size a step's temporaries are small and trimming would only cost time.
TRIM_AFTER_TOKENS = 256

if TYPE_CHECKING:
    from anyquant.models.protocol import EngineModel


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    kv_cache_gb: float | None = None  # None: room for max_num_seqs full-length sequences, capped at 2 GiB
    # Instead of kv_cache_gb: this fraction of the memory still free once the weights are loaded
    # (RAM on CPU, device memory on CUDA), capped at what max_num_seqs full-length sequences need.
    kv_cache_fraction: float | None = None
    enable_prefix_caching: bool = True
    # "auto": the cache in the compute dtype; "int8": rows of int8 codes and a scale
    # (layers/kv_quant.py), half the bytes per token of bf16 at a small accuracy cost.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; choose one of "
                f"{', '.join(KV_CACHE_DTYPES)}"
            )
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.kv_cache_fraction is not None:
            if not 0 < self.kv_cache_fraction <= 1:
                raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
            if self.kv_cache_gb is not None:
                raise ValueError("give kv_cache_gb or kv_cache_fraction, not both")


@dataclass
class RequestDelta:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served (set on the finished delta)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and counters (the async engine publishes one after every
    step, read by metrics and /health)."""

    num_waiting: int = 0
    num_running: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    num_nonfinite_events: int = 0
    num_preemptions: int = 0
    num_step_failures: int = 0


@dataclass
class _State:
    request: Request
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    emitted_tokens: int = 0
    num_cached_tokens: int | None = None  # at the first admission (a preempted request re-admits)
    pending_logprobs: list[dict[int, float]] = field(default_factory=list)
    penalties: PenaltyTracker | None = None  # made at the first penalised sampling


def _penalised(params: SamplingParams) -> bool:
    return bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)


def _edits_logits(params: SamplingParams) -> bool:
    """Whether the row must be changed before choosing (so the step's shared argmax won't do)."""
    return _penalised(params) or bool(params.logit_bias) or params.min_tokens > 0


def _by_argmax(params: SamplingParams) -> bool:
    """The token is the row's argmax: nothing else (sampling, penalties, bias, logprobs) needs the row."""
    return params.greedy and params.logprobs is None and not _edits_logits(params)


def available_memory_bytes(device: torch.device) -> int:
    """Memory a KV cache could still take: free device memory on CUDA, MemAvailable on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def kv_pages(config: EngineConfig, bytes_per_page: int, device: torch.device | None = None) -> int:
    per_seq_pages = -(-config.max_model_len // config.page_size)
    needed = config.max_num_seqs * per_seq_pages * bytes_per_page
    if config.kv_cache_gb is not None:
        budget = int(config.kv_cache_gb * 2**30)
    elif config.kv_cache_fraction is not None:
        free = available_memory_bytes(device or torch.device("cpu"))
        budget = min(int(config.kv_cache_fraction * free), needed)
    else:
        budget = min(needed, 2 << 30)
    pages = budget // bytes_per_page
    if pages < 1:
        raise ValueError(f"KV cache budget of {budget} bytes holds no page of {bytes_per_page} bytes")
    return pages


class Engine:
    def __init__(
        self,
        model: EngineModel,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # The cache's own dtype: the compute dtype, or int8 rows (whose bytes the budget counts).
        self.cache_dtype = cache_dtype(config.kv_cache_dtype, dtype)
        self.compute_dtype = dtype
        model.cache_shape.check_cache_dtype(self.cache_dtype, type(model).__name__)
        per_page = PagedKVCache.page_bytes_for_model(model, config.page_size, self.cache_dtype)
        num_pages = kv_pages(config, per_page, device)
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = int(model.args.vocab_size)  # the logits' width
        # Prompt ids are checked against it: the embedding may hold ids the head never yields
        # (mllama's <|image|> token).
        self.prompt_vocab_size = int(getattr(model, "prompt_vocab_size", self.vocab_size))
        self.runner = ModelRunner(model, num_pages, config.page_size, self.cache_dtype, device, dtype)
        self.allocator = PageAllocator(num_pages, config.page_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
                max_model_len=config.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
            ),
            self.allocator,
        )
        self.dtype = dtype
        # Guided decoding: compiled grammars (shared with the server, which compiles ahead on its
        # own threads) and the running requests' matchers. Nothing is built until a request asks.
        # Masks are filled on a worker thread while the forward pass runs (on CPU this measured
        # the same as filling them after it, within noise: benchmarks/RESULTS.md).
        self.grammars = GrammarCompiler(tokenizer, int(model.args.vocab_size))
        self.guided = GuidedDecoder(self.grammars)
        self._states: dict[str, _State] = {}
        self._ids = itertools.count()
        self.num_nonfinite_events = 0
        self.num_step_failures = 0  # forward passes that raised (each then retried request by request)
        log.info(
            "KV cache: %d pages of %d tokens (%.1f MiB, %s)",
            num_pages,
            config.page_size,
            num_pages * per_page / 2**20,
            str(self.cache_dtype).removeprefix("torch."),
        )

    # -- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        multimodal: MultimodalPrompt | None = None,
    ) -> str:
        """`multimodal`: the request's images, laid out by `engine.multimodal.prepare_prompt`
        (which also expanded `prompt_token_ids`' placeholders)."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        outside = next((t for t in params.logit_bias or {} if t >= self.vocab_size), None)
        if outside is not None:
            raise ValueError(
                f"logit_bias: token id {outside} is outside the vocabulary [0, {self.vocab_size})"
            )
        eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else set()
        if multimodal is not None and self.runner.encoder_cache is None:
            raise ValueError("this model takes no images")
        request = Request(rid, prompt_token_ids, params, eos, self.prompt_vocab_size, multimodal)
        if params.guided_decoding is not None:
            self.guided.add(rid, params.guided_decoding)  # GuidedDecodingError (a ValueError)
        try:
            self.scheduler.add(request)  # raises ValueError naming the limits
        except Exception:
            self.guided.remove(rid)
            raise
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self._states[rid] = _State(
            request,
            IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens),
            generator,
        )
        return rid

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._states.pop(request_id, None)
        self.guided.remove(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def has_request(self, request_id: str) -> bool:
        """Whether the request is still waiting or running (False once finished or aborted)."""
        return self.scheduler.get(request_id) is not None

    # -- what callers read (the server, the async engine): scheduler, allocator and runner stay
    # behind these --------------------------------------------------------------------------------
    @property
    def num_kv_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            kv_pages_used=self.allocator.num_used,
            kv_pages_total=self.allocator.num_pages,
            num_nonfinite_events=self.num_nonfinite_events,
            num_preemptions=self.scheduler.num_preemptions,
            num_step_failures=self.num_step_failures,
        )

    def prompt_logits(self, ids: list[int]) -> Tensor:
        """fp32 logits [len(ids), vocab] of a teacher-forced pass over `ids`, in a cache of its own
        (the paged cache and the running requests are untouched). Call between steps."""
        return prompt_logits(self.runner.model, ids, self.cache_dtype, self.runner.device, self.compute_dtype)

    def abandon_step(self, error: str) -> set[str]:
        """A step broke outside the forward pass (which `step` isolates itself): finish the
        requests of its open plan with `error` and return their ids. With no open plan (the
        failure came before or after one) nothing is finished here and the running requests' ids
        are returned, for the caller to abort."""
        plan = self.scheduler.open_plan
        if plan is None:
            return {r.request_id for r in self.scheduler.running}
        affected = {r.request_id for r, _ in plan.scheduled}
        self.scheduler.abandon(plan, error)
        return affected or {r.request_id for r in self.scheduler.running}

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        plan = self.scheduler.schedule()
        masks = self.guided.begin_step(plan)  # filled while the forward pass runs
        try:
            out = self.runner.execute(plan)
        except EngineDeadError as exc:
            # Nobody's fault in particular and nothing to retry: close the plan, let it surface.
            self.scheduler.abandon(plan, f"the engine failed: {exc}")
            raise
        except Exception as exc:
            out = self._isolate_failure(plan, exc)
        sampled = self._sample_step(out, masks)
        if plan.num_tokens >= TRIM_AFTER_TOKENS:
            return_freed_memory()
        self.scheduler.update(plan, sampled)
        if masks is not None:
            self._end_grammars(sampled)
        deltas = []
        touched = {r.request_id: r for r, _ in plan.scheduled} | {r.request_id: r for r in plan.finished}
        for rid, request in touched.items():
            delta = self._delta(rid, request)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _sample_step(self, out: StepLogits, masks: StepMasks | None = None) -> dict[str, int | None]:
        """One token per sampling request. The non-finite check and the greedy choice run once
        over the whole step's logits, with one transfer to the host; only requests that need more
        (temperature, penalties, logprobs) are sampled row by row. Guided requests' choices are
        constrained by their masks (guided.py), and their matchers advance by the chosen token."""
        if not out.request_ids:
            if masks is not None:
                masks.wait()
            return {}
        finite, argmax = finite_rows_and_argmax(out.logits)
        if masks is not None:
            by_argmax = {
                rid for rid in out.request_ids if _by_argmax(self._states[rid].request.sampling_params)
            }
            argmax = self.guided.apply(masks, out.request_ids, out.logits, argmax, by_argmax)
        sampled: dict[str, int | None] = {}
        for i, rid in enumerate(out.request_ids):
            state = self._states[rid]
            if not finite[i]:
                self.num_nonfinite_events += 1
                dtype = str(self.dtype).removeprefix("torch.")
                self.scheduler.finish(
                    rid,
                    RequestStatus.FINISHED_ERROR,
                    f"non-finite logits with compute dtype {dtype}: the activations overflowed "
                    f"{dtype}; use dtype {overflow_advice(self.runner.device)}",
                )
                continue
            params = state.request.sampling_params
            if _by_argmax(params):
                sampled[rid] = argmax[i]
            else:
                sampled[rid] = self._sample(state, out.logits[i])
            token = sampled[rid]
            if token is not None and not self.guided.accept(rid, token):
                del sampled[rid]
                self.scheduler.finish(
                    rid,
                    RequestStatus.FINISHED_ERROR,
                    f"guided decoding: the grammar allows no token of the vocabulary here (sampled {token})",
                )
        return sampled

    def _end_grammars(self, sampled: dict[str, int | None]) -> None:
        """Finish the requests whose grammar ended this step. Usually the grammar's stop token
        (EOS) already finished the request; with ignore_eos, or a stop token the tokenizer does
        not list as EOS, the end of the grammar is the end of the request."""
        for rid in sampled:
            request = self.scheduler.get(rid)
            if request is not None and not request.is_finished and self.guided.is_terminated(rid):
                self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED)

    def _isolate_failure(self, plan: StepPlan, exc: Exception) -> StepLogits:
        """The batched forward raised: run each request of the step alone, so that only the ones
        that fail on their own are failed. Re-running is exact: a request's step writes K/V only at
        its own uncomputed positions (never into shared prefix pages), and a re-run rewrites them.
        Returns the logits of the requests that succeeded alone."""
        self.num_step_failures += 1
        log.warning(
            "a forward pass over %d requests raised %s: %s; retrying them one by one",
            len(plan.scheduled),
            type(exc).__name__,
            exc,
        )
        if len(plan.scheduled) == 1:
            request = plan.scheduled[0][0]
            self._fail_forward(request.request_id, exc)
            return StepLogits.empty()
        outputs: list[StepLogits] = []
        for entry in plan.scheduled:
            try:
                outputs.append(self.runner.execute(StepPlan(scheduled=[entry])))
            except EngineDeadError:
                self.scheduler.abandon(plan, f"the engine failed: {exc}")
                raise
            except Exception as alone:
                self._fail_forward(entry[0].request_id, alone)
        outputs = [o for o in outputs if o.request_ids]
        if not outputs:
            return StepLogits.empty()
        return StepLogits(
            [rid for o in outputs for rid in o.request_ids], torch.cat([o.logits for o in outputs])
        )

    def _fail_forward(self, rid: str, exc: Exception) -> None:
        log.error("request %s failed in the forward pass", rid, exc_info=exc)
        self.scheduler.finish(
            rid,
            RequestStatus.FINISHED_ERROR,
            f"the forward pass failed for this request ({type(exc).__name__}: {exc}); the other "
            "requests of its step were re-run without it and carry on",
        )

    def _sample(self, state: _State, row: Tensor) -> int:
        request, params = state.request, state.request.sampling_params
        processed = row
        if _edits_logits(params):  # these edit the row in place
            processed = row.clone()
            stops = request.eos_token_ids if not params.ignore_eos else frozenset()
            stops = stops | frozenset(params.stop_token_ids)
            apply_logit_processing(processed, params, request.num_output_tokens, stops)
            if _penalised(params):
                if state.penalties is None:
                    state.penalties = PenaltyTracker(params, request.prompt_token_ids)
                state.penalties.update(request.output_token_ids)
                processed = state.penalties.apply(processed)
        token = sample(processed, params, state.generator)
        if params.logprobs is not None:
            # The model's own distribution, before bias and penalties (vLLM's default too).
            lp = torch.log_softmax(row, dim=-1)
            top = torch.topk(lp, params.logprobs).indices.tolist() if params.logprobs else []
            state.pending_logprobs.append({t: float(lp[t]) for t in [token, *top]})
        return token

    def _delta(self, rid: str, request: Request) -> RequestDelta | None:
        state = self._states.get(rid)
        if state is None:
            return None
        if state.num_cached_tokens is None and request.num_computed_tokens:
            state.num_cached_tokens = request.num_cached_tokens
        new_tokens = request.output_token_ids[state.emitted_tokens :]
        state.emitted_tokens = request.num_output_tokens
        finished = request.is_finished
        text = state.detokenizer.update(request.output_token_ids, finished)
        if state.detokenizer.stopped and not finished:
            self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED)
            finished = True
        if not new_tokens and not text and not finished:
            return None
        logprobs, state.pending_logprobs = state.pending_logprobs, []
        if finished:
            self._states.pop(rid, None)
            self.guided.remove(rid)
        return RequestDelta(
            rid,
            new_tokens,
            text,
            finished,
            request.finish_reason if finished else None,
            request.error,
            logprobs,
            (state.num_cached_tokens or 0) if finished else 0,
        )
