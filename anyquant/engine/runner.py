"""ModelRunner: a scheduler's StepPlan -> one batched forward -> fp32 logits of the sampling requests.

Owns building the step's flat token batch and its attention metadata as tensors (slot mapping,
block tables, query and context lengths), with work proportional to the step's new tokens: each
request's block-table row lives across steps and grows by appending its new pages. Requests with
images add their encoder rows (`InputEmbeds`, from the encoder cache) and, for families with
multi-row positions (M-RoPE), their positions; requests of cross-attention families (mllama)
add their sequence to the step's `CrossAttentionStep` (their images' rows on their first step),
and finished ones release their state. Knows nothing about sampling policy or request lifecycles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from anyquant.engine.capture import CapturedDecode, bucket_sizes, compile_unavailable_reason
from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.engine.multimodal import CrossAttentionRequests, EncoderCache
from anyquant.engine.request import Request
from anyquant.engine.scheduler import StepPlan
from anyquant.models.base import DecoderLM, InputEmbeds
from anyquant.models.multimodal import CrossAttentionStep, CrossSequence, ImageEncoder

if TYPE_CHECKING:
    from anyquant.models.multimodal import ImageInput
    from anyquant.models.protocol import EngineModel

log = logging.getLogger("anyquant.engine")


@dataclass
class StepLogits:
    """fp32 logits [R, vocab] of this step's sampling requests, row i for `request_ids[i]`."""

    request_ids: list[str]
    logits: Tensor

    @staticmethod
    def empty() -> StepLogits:
        return StepLogits([], torch.empty(0, 0))


@dataclass
class _Row:
    request: Request
    row: int
    num_pages: int  # pages of the request already written into its row
    last_page: int  # the last of them, to notice a page table that was rebuilt
    preemptions: int  # the request's count when the row was written


class BlockTables:
    """Each running request's page ids as one row of a host tensor kept across steps.

    A request's row is written once and then grows by its new pages only; it is rewritten when
    the request was preempted (its pages were freed and allocated again) and released once the
    request finished."""

    def __init__(self, rows: int = 8, width: int = 16) -> None:
        self.table = torch.zeros(rows, width, dtype=torch.long)
        self._rows: dict[str, _Row] = {}
        self._free = list(range(rows - 1, -1, -1))

    def row_of(self, request: Request) -> int:
        pages = request.page_ids
        entry = self._rows.get(request.request_id)
        if entry is not None and (
            entry.preemptions != request.num_preemptions
            or len(pages) < entry.num_pages
            or (entry.num_pages and pages[entry.num_pages - 1] != entry.last_page)
        ):
            entry.num_pages = 0  # the page table was rebuilt: write the row again
        if entry is None:
            entry = _Row(request, self._take_row(), 0, -1, request.num_preemptions)
            self._rows[request.request_id] = entry
        entry.preemptions = request.num_preemptions
        if len(pages) > entry.num_pages:
            self._fit(len(pages))
            self.table[entry.row, entry.num_pages : len(pages)] = torch.tensor(
                pages[entry.num_pages :], dtype=torch.long
            )
            entry.num_pages, entry.last_page = len(pages), pages[-1]
        return entry.row

    def release_finished(self) -> None:
        """Give back the rows of finished requests (a sweep over the tracked requests only)."""
        for rid in [rid for rid, e in self._rows.items() if e.request.is_finished]:
            self._free.append(self._rows.pop(rid).row)

    def _take_row(self) -> int:
        if not self._free:
            old = self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def _fit(self, width: int) -> None:
        if width > self.table.shape[1]:
            grown = torch.zeros(self.table.shape[0], max(width, 2 * self.table.shape[1]), dtype=torch.long)
            grown[:, : self.table.shape[1]] = self.table
            self.table = grown


class ModelRunner:
    def __init__(
        self,
        model: EngineModel,
        num_pages: int,
        page_size: int,
        cache_dtype: torch.dtype,
        device: torch.device,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """`cache_dtype`: the KV cache's (the compute dtype, or int8: engine/kv_cache.py, which then
        needs `compute_dtype`, the queries')."""
        self.model = model
        self.device = device
        self.cache = PagedKVCache.for_model(model, num_pages, page_size, cache_dtype, device, compute_dtype)
        self.tables = BlockTables()
        # The compiled decode step, once `capture` succeeded (None: every step runs eagerly).
        self.captured: CapturedDecode | None = None
        self.encoder_cache = EncoderCache(model.embed_images) if isinstance(model, ImageEncoder) else None
        self.cross_requests = CrossAttentionRequests()

    def execute(self, plan: StepPlan) -> StepLogits:
        """Run the plan's tokens; return the logits of every request that samples this step."""
        self.tables.release_finished()
        page = self.cache.page_size
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        # Rows of multi-row positions (M-RoPE: 3) when any request of the step has them, else 0.
        multirow = max(
            (
                r.multimodal.positions.shape[0]
                for r, _ in plan.scheduled
                if r.multimodal is not None and r.multimodal.positions is not None
            ),
            default=0,
        )
        position_parts: list[Tensor] = []  # multi-row positions, request by request
        embed_rows: list[Tensor] = []
        embed_values: list[Tensor] = []
        cross: list[CrossSequence] = []
        for request, n in plan.scheduled:
            c = request.num_computed_tokens
            mm = request.multimodal
            if mm is not None and mm.cross is not None:
                cross.append(self.cross_requests.sequence(request, len(ids), n, self._image_rows))
            if mm is not None and c < mm.num_prompt_tokens:
                for offset, values in mm.step_embeddings(c, n, self._image_rows):
                    first = len(ids) + offset
                    embed_rows.append(torch.arange(first, first + values.shape[0]))
                    embed_values.append(values)
            if multirow:
                if mm is not None and mm.positions is not None:
                    position_parts.append(mm.step_positions(c, n))
                else:
                    position_parts.append(torch.arange(c, c + n).expand(multirow, -1))
            rows.append(self.tables.row_of(request))
            ids.extend(request.all_token_ids[c : c + n])
            positions.extend(range(c, c + n))
            query_lens.append(n)
            context_lens.append(c + n)
            if request.reaches_end(n):
                sample_rows.append(len(ids) - 1)
                sample_ids.append(request.request_id)
        if not ids:
            return StepLogits.empty()
        width = -(-max(context_lens) // page)
        block_tables = self.tables.table[torch.tensor(rows), :width]
        pos = torch.tensor(positions, dtype=torch.long)
        token_seq = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(query_lens))
        slot_mapping = block_tables[token_seq, pos // page] * page + pos % page
        captured = self.captured
        if (
            captured is not None
            and len(ids) == len(rows) <= captured.max_batch
            and not multirow
            and not embed_rows
            and len(sample_rows) == len(rows)
        ):  # every sequence decodes one token and samples from it
            try:
                logits = captured.run(ids, positions, slot_mapping, block_tables, context_lens)
            except Exception as error:  # e.g. a guard that fails and a recompile that cannot work
                # The eager step below stores the same keys/values again: nothing is lost.
                log.error("the compiled decode step failed (%s: %s); steps run eagerly from now on",
                          type(error).__name__, error)  # fmt: skip
                self.captured = None
            else:
                return StepLogits(sample_ids, logits)
        dev = self.device
        ctx = PagedAttention(self.cache, slot_mapping.to(dev), block_tables.to(dev), query_lens, context_lens)
        token_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        # Without a sampling row the step still needs one row of logits to run the LM head on.
        wanted = sample_rows or [len(ids) - 1]
        model_pos = torch.cat(position_parts, dim=1) if multirow else pos
        extra: dict[str, Any] = {}
        released = self.cross_requests.take_finished()
        if cross or released:
            extra["cross"] = CrossAttentionStep(tuple(cross), released)
        if embed_rows:
            extra["input_embeds"] = InputEmbeds(
                torch.cat(embed_rows).to(dev), torch.cat(embed_values).to(dev)
            )
        with torch.inference_mode():
            logits = self.model(token_ids, model_pos.to(dev), ctx, torch.tensor(wanted, device=dev), **extra)
        if not sample_rows:
            return StepLogits.empty()
        return StepLogits(sample_ids, logits.cpu())

    def capture(self, max_position: int, max_num_seqs: int, backend: str = "inductor") -> str | None:
        """Compile the decode step of every bucket up to `max_num_seqs` sequences (the warm-up);
        None, or why the steps stay eager (logged; never raised: eager always works)."""
        reason = compile_unavailable_reason(self.model, self.device, backend)
        if reason is None:
            try:
                buckets = bucket_sizes(max_num_seqs)
                assert isinstance(self.model, DecoderLM), "compile_unavailable_reason refuses other models"
                captured = CapturedDecode(self.model, self.cache, max_position, buckets, backend)
                captured.warm_up()
            except Exception as error:  # a trace or an Inductor build that fails: stay eager
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                reason = f"torch.compile failed ({type(error).__name__}: {first_line})"
            else:
                self.captured = captured
        if reason is not None:
            log.warning("decode steps run eagerly: %s", reason)
        return reason

    def _image_rows(self, image: ImageInput) -> Tensor:
        if self.encoder_cache is None:
            raise ValueError("this model takes no images")
        return self.encoder_cache.embeddings(image)
