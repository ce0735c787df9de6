"""Repetition, presence and frequency penalties kept per request, updated by the new tokens only.

vLLM's meaning: the repetition penalty divides positive (multiplies negative) logits of every
token seen in the prompt or the output; presence subtracts a constant from, and frequency
subtracts count times a constant from, the logits of tokens the output already holds. Rebuilding
those sets from the whole context each step costs O(context) Python work per token; here the
prompt is read once, each step adds only the tokens sampled since the last one, and applying
the penalties is a few vector ops over the distinct tokens seen.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyquant.engine.sampling import SamplingParams


class _IdSet:
    """Distinct token ids in insertion order, as a growing tensor (amortised O(1) per add), with
    each id's position."""

    def __init__(self) -> None:
        self.ids = torch.empty(64, dtype=torch.long)
        self.position: dict[int, int] = {}

    @property
    def size(self) -> int:
        return len(self.position)

    def add(self, token: int) -> int:
        """Add `token` if new; its position."""
        pos = self.position.get(token)
        if pos is None:
            pos = self.position[token] = self.size
            if pos == self.ids.numel():
                self.ids = torch.cat([self.ids, torch.empty_like(self.ids)])
            self.ids[pos] = token
        return pos

    def tensor(self) -> Tensor:
        return self.ids[: self.size]


class PenaltyTracker:
    """One request's penalty state: which tokens it has seen and how often its output has each."""

    def __init__(self, params: SamplingParams, prompt: list[int]) -> None:
        self.params = params
        self.seen = _IdSet()  # prompt and output: the repetition penalty's tokens
        self.output = _IdSet()  # output only: presence and frequency
        self.counts = torch.zeros(64, dtype=torch.float32)  # per `output` position
        self.consumed = 0  # output tokens already counted
        for token in prompt:
            self.seen.add(token)

    def update(self, output_token_ids: list[int]) -> None:
        """Count the output tokens sampled since the last call (the list only grows: preemption
        recomputes the KV cache but keeps the output)."""
        for token in output_token_ids[self.consumed :]:
            self.seen.add(token)
            pos = self.output.add(token)
            if pos == self.counts.numel():
                self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.counts[pos] += 1.0
        self.consumed = len(output_token_ids)

    def apply(self, logits: Tensor) -> Tensor:
        """Penalise `logits` [vocab] fp32 in place (and return it)."""
        p = self.params
        if p.repetition_penalty != 1.0 and self.seen.size:
            ids = self.seen.tensor()
            vals = logits[ids]
            logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.output.size:
            ids = self.output.tensor()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * self.counts[: self.output.size]
        return logits
