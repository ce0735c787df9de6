"""`LLM`: load a checkpoint once, then generate text, score tokens and measure perplexity.

Owns the user-facing offline API (vLLM-like names). It runs one sequence at a time through the
model with a contiguous KV cache; batching and paging belong to the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from anyquant.engine.numerics import first_nonfinite_module
from anyquant.engine.sampling import SamplingParams, apply_penalties, sample
from anyquant.errors import AnyquantError, NumericsError
from anyquant.layers.attention import SequenceKVCache
from anyquant.loading.loader import LoadedModel, load_model
from anyquant.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    logprobs: list[dict[int, float]] | None = field(default=None)


class LLM:
    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        kernel: str | None = None,
        debug_numerics: bool = False,
    ) -> None:
        """`debug_numerics`: when a step's logits are not finite, replay it with per-layer checks and
        name the first layer whose output overflowed (costs nothing until a failure)."""
        self.debug_numerics = debug_numerics
        if tensor_parallel_size != 1:
            raise AnyquantError("tensor_parallel_size > 1 is not available yet in this build")
        self.loaded: LoadedModel = load_model(model, device=device, dtype=dtype, kernel=kernel)
        self.model = self.loaded.model
        self.device = self.loaded.device
        self.dtype = self.loaded.compute_dtype
        limit = int(self.loaded.config.get("max_position_embeddings", 2048))
        self.max_model_len = min(max_model_len or limit, limit) if max_model_len else limit
        self.tokenizer: Tokenizer | None = None
        if (Path(model) / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer(model, self.loaded.config)

    # -- scoring -----------------------------------------------------------------------------
    def _forward(self, ids: list[int], cache: SequenceKVCache, start: int, last_only: bool) -> Tensor:
        token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        rows = torch.tensor([len(ids) - 1], device=self.device) if last_only else None
        snapshot = cache.clone() if self.debug_numerics else None
        with torch.inference_mode():
            logits = self.model(token_ids, cache, start, rows)
        # One reduction per step: all-NaN logits would otherwise make argmax answer token 0 forever.
        if not bool(torch.isfinite(logits).all()):
            dtype = str(self.dtype).removeprefix("torch.")
            where = ""
            if snapshot is not None:
                layer = first_nonfinite_module(
                    self.model, lambda: self.model(token_ids, snapshot, start, rows)
                )
                where = f"; first non-finite output: {layer}" if layer else ""
            else:
                where = (
                    "; run with debug_numerics=True (--debug-numerics) to name the first overflowing layer"
                )
            raise NumericsError(
                f"non-finite logits at positions {start}..{start + len(ids) - 1} with compute dtype {dtype}"
                f"{where}. The activations overflowed {dtype}; use dtype='float32' or 'bfloat16'"
            )
        return logits

    def _check_length(self, n: int) -> None:
        if n > self.max_model_len:
            raise AnyquantError(f"sequence of {n} tokens exceeds max_model_len={self.max_model_len}")
        if n == 0:
            raise AnyquantError("empty prompt: at least one token is needed")

    def logits(self, token_ids: list[int]) -> Tensor:
        """Teacher-forced fp32 logits [T, vocab] at every position."""
        self._check_length(len(token_ids))
        cache = self.model.new_cache(len(token_ids), self.dtype, self.device)
        return self._forward(list(token_ids), cache, 0, last_only=False).cpu()

    def perplexity(self, text_or_ids: str | list[int]) -> float:
        ids = self._encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        nll, count = 0.0, 0
        window = self.max_model_len
        for begin in range(0, max(len(ids) - 1, 1), window):
            chunk = ids[begin : begin + window + 1]
            if len(chunk) < 2:
                break
            logp = torch.log_softmax(self.logits(chunk[:-1]), dim=-1)
            target = torch.tensor(chunk[1:])
            nll -= float(logp.gather(1, target[:, None]).sum())
            count += len(chunk) - 1
        return math.exp(nll / max(count, 1))

    # -- generation --------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise AnyquantError("this model directory has no tokenizer.json; pass prompt_token_ids instead")
        return self.tokenizer.encode(text)

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        requests: list[tuple[str | None, list[int]]]
        if prompt_token_ids is not None:
            requests = [(None, list(ids)) for ids in prompt_token_ids]
        elif prompts is not None:
            requests = [(p, self._encode(p)) for p in prompts]
        else:
            raise AnyquantError("generate() needs prompts or prompt_token_ids")
        return [self._generate_one(text, ids, params) for text, ids in requests]

    def _generate_one(self, prompt: str | None, ids: list[int], params: SamplingParams) -> RequestOutput:
        self._check_length(len(ids))
        budget = min(params.max_tokens, self.max_model_len - len(ids))
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            stop_ids |= self.tokenizer.eos_token_ids
        cache = self.model.new_cache(len(ids) + max(budget, 0), self.dtype, self.device)
        out: list[int] = []
        logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        finish = "length"
        logits = self._forward(ids, cache, 0, last_only=True)[-1]
        text = ""
        while len(out) < budget:
            row = apply_penalties(logits.clone(), params, out, ids)
            token = sample(row, params, generator)
            if logprobs is not None:
                lp = torch.log_softmax(logits, dim=-1)
                top = torch.topk(lp, params.logprobs).indices.tolist() if params.logprobs else []
                logprobs.append({t: float(lp[t]) for t in [token, *top]})
            if token in stop_ids:
                finish = "stop"
                break
            out.append(token)
            if params.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(out)
                hit = min((text.find(s) for s in params.stop if s in text), default=-1)
                if hit >= 0:
                    text, finish = text[:hit], "stop"
                    break
            if len(out) >= budget:
                break
            logits = self._forward([token], cache, len(ids) + len(out) - 1, last_only=True)[-1]
        if finish != "stop" or not params.stop:
            text = self.tokenizer.decode(out) if self.tokenizer is not None else ""
        return RequestOutput(prompt, ids, text, out, finish, logprobs)
