"""Guided decoding during generation: one grammar matcher per request, one token mask per step.

Owns the matchers of the running guided requests, filling the step's bitmask (on a worker thread
while the forward pass runs, when `overlap` is on, as by default), applying it to the step's
logits in place (a disallowed token's logit becomes -inf, so greedy and sampled choices alike pick
only tokens the grammar allows; EOS only where the grammar may end) and advancing each matcher
with the token its request accepted. Requests without a grammar in the same batch are untouched. Everything runs on
the host next to the sampler, with no transfer of its own: the masks are filled from matcher
state, and the logits they apply to are already on the host. Compiling lives in grammar.py.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anyquant.engine.grammar import Grammar, GrammarCompiler
from anyquant.engine.sampling import GuidedDecodingParams, argmax_rows
from anyquant.engine.scheduler import StepPlan


@dataclass
class StepMasks:
    """The bitmask rows of one step: row i constrains `request_ids[i]`. `pending` is the fill
    still running on the worker thread (None once done, or when filled in place)."""

    request_ids: list[str]
    bitmask: Tensor
    pending: Future[None] | None = None

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


class GuidedDecoder:
    def __init__(self, compiler: GrammarCompiler, overlap: bool = True) -> None:
        self.compiler = compiler
        # Fill the masks on a worker thread while the forward pass runs (True), or after it.
        self.overlap = overlap
        self._matchers: dict[str, Any] = {}
        self._grammars: dict[str, Grammar] = {}
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher, made with the first matcher
        self._pool: ThreadPoolExecutor | None = None
        self._buffer: Tensor | None = None

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    # -- requests ------------------------------------------------------------------------------
    def add(self, request_id: str, params: GuidedDecodingParams) -> None:
        """Compile (or find in the cache) the request's grammar and start its matcher; raises
        GuidedDecodingError naming the problem."""
        grammar = self.compiler.compile(params)  # first: without xgrammar it says how to install it
        import xgrammar

        self._matchers[request_id] = xgrammar.GrammarMatcher(grammar.compiled)
        self._grammars[request_id] = grammar
        if self._batch is None:
            self._batch = xgrammar.BatchGrammarMatcher(max_threads="auto")

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        self._grammars.pop(request_id, None)

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's matcher by its sampled token; False if the grammar refused it
        (only possible if the token was not chosen from a masked row)."""
        matcher = self._matchers.get(request_id)
        return matcher is None or bool(matcher.accept_token(token))

    def is_terminated(self, request_id: str) -> bool:
        """The grammar has ended (its stop token was accepted): the request must finish."""
        matcher = self._matchers.get(request_id)
        return matcher is not None and bool(matcher.is_terminated())

    # -- one step ------------------------------------------------------------------------------
    def begin_step(self, plan: StepPlan) -> StepMasks | None:
        """Start filling the masks of the plan's guided requests that sample this step. Matcher
        states are final once the previous step accepted its tokens, so the fill can overlap the
        forward pass; `apply` waits for it."""
        if not self._matchers:
            return None
        ids = [
            r.request_id
            for r, n in plan.scheduled
            if r.request_id in self._matchers and r.reaches_end(n) and not r.is_finished
        ]
        if not ids:
            return None
        bitmask = self._bitmask(len(ids))
        # The worker gets its own lists: it never reads this object's dicts, which the engine
        # thread may change (a request added) while the fill runs.
        matchers = [self._matchers[rid] for rid in ids]
        allowed = [self._grammars[rid].allowed for rid in ids]
        masks = StepMasks(ids, bitmask)
        if self.overlap:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="anyquant-grammar")
            masks.pending = self._pool.submit(self._fill, matchers, allowed, bitmask)
        else:
            self._fill(matchers, allowed, bitmask)
        return masks

    def _fill(self, matchers: list[Any], allowed: list[Tensor | None], bitmask: Tensor) -> None:
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        shared = allowed[0]
        if shared is not None and all(row is shared for row in allowed):
            bitmask &= shared  # every row a JSON grammar: one op (they share one row)
            return
        # Row by row: indexing several rows at once (bitmask[[i, j]] &= row) costs milliseconds.
        for i, row in enumerate(allowed):
            if row is not None:
                bitmask[i] &= row

    def apply(
        self,
        masks: StepMasks | None,
        request_ids: list[str],
        logits: Tensor,
        argmax: list[int],
        by_argmax: set[str],
    ) -> list[int]:
        """Constrain the step's choices: `logits` [R, vocab] (row i of `request_ids[i]`) and their
        unconstrained `argmax` -> the argmax each row has under its mask. Rows of `by_argmax`
        requests (greedy: only the argmax is read) whose argmax the grammar allows are left as they
        are, since masking cannot change a choice that is allowed (masking only lowers the others);
        the other guided rows are masked in place (sampling reads them) and their argmax redone."""
        if masks is None:
            return argmax
        masks.wait()
        where = {rid: i for i, rid in enumerate(request_ids)}
        rows: list[int] = []  # logits rows to mask
        sources: list[int] = []  # their bitmask rows
        for j, rid in enumerate(masks.request_ids):
            i = where.get(rid)
            if i is None or (rid in by_argmax and self._allows(masks.bitmask[j], argmax[i])):
                continue
            rows.append(i)
            sources.append(j)
        if not rows:
            return argmax
        import xgrammar

        vocab = min(self.compiler.vocab_size, logits.shape[-1])
        if rows == sources == list(range(len(request_ids))):  # every row, in order: no realignment
            xgrammar.apply_token_bitmask_inplace(logits, masks.bitmask, vocab_size=vocab)
        else:
            aligned = torch.full((len(request_ids), masks.bitmask.shape[1]), -1, dtype=torch.int32)
            aligned[rows] = masks.bitmask[sources]
            xgrammar.apply_token_bitmask_inplace(logits, aligned, vocab_size=vocab, indices=rows)
        redo = [i for i in rows if request_ids[i] in by_argmax]
        if redo:
            argmax = list(argmax)
            for i, token in zip(redo, argmax_rows(logits[redo]).tolist()):
                argmax[i] = token
        return argmax

    def _allows(self, row: Tensor, token: int) -> bool:
        if token >= self.compiler.vocab_size:
            return False
        return bool((int(row[token >> 5]) >> (token & 31)) & 1)

    def _bitmask(self, rows: int) -> Tensor:
        """A [rows, words] int32 view of a buffer reused across steps (each fill writes every bit
        of its rows); one step's masks are applied before the next step's fill starts."""
        words = -(-self.compiler.vocab_size // 32)
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(max(rows, 8), words, dtype=torch.int32)
        return self._buffer[:rows]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
