"""What the LM head receives and returns for one prompt, for the head tests' float64 references."""

from __future__ import annotations

import torch

from anyquant import LLM


def head_input_and_logits(llm: LLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states the LM head is called with (captured by a forward pre-hook) and the
    model's logits for `ids`, both as float64."""
    head = llm.loaded.model.lm_head
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        logits = llm.logits(ids)
    finally:
        hook.remove()
    return seen[0].double(), logits.double()
