"""Run by torchrun in tests: every rank constructs the same LLM; only rank 0 returns from it."""

from __future__ import annotations

import sys

import torch

from anyquant import LLM

if __name__ == "__main__":
    model, ids, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
    llm = LLM(model, dtype="float32", tensor_parallel_size=2)  # ranks > 0 serve, then exit here
    torch.save(llm.logits(ids), out)
    llm.close()
