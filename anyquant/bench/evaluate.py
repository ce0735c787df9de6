"""Perplexity over a corpus of documents, for measuring what quantization costs.

Owns the protocol of ../shared/models/stories260K/expected_outputs.json: split on a document
separator, strip, [BOS] + encode(doc) truncated to the context, score ids[1:] given their prefix,
average the negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from anyquant.llm import LLM


@dataclass(frozen=True)
class Perplexity:
    mean_nll: float
    perplexity: float
    tokens: int


def corpus_perplexity(
    llm: LLM, text: str, separator: str = "<|endoftext|>", max_len: int = 512
) -> Perplexity:
    if llm.tokenizer is None:
        raise ValueError("perplexity over text needs a tokenizer")
    nll, count = 0.0, 0
    for doc in text.split(separator):
        doc = doc.strip()
        if not doc:
            continue
        ids = llm.tokenizer.encode(doc)[:max_len]  # the tokenizer's post-processor adds BOS
        if len(ids) < 2:
            continue
        logp = torch.log_softmax(llm.logits(ids[:-1]), dim=-1)
        nll -= float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
    mean = nll / max(count, 1)
    return Perplexity(mean, math.exp(mean), count)
