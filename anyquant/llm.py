"""`LLM`: load a checkpoint once, then generate text, score tokens and measure perplexity.

Owns the user-facing offline API (vLLM-like names). Generation runs on the same `Engine` as the
server (continuous batching over a paged KV cache); scoring runs one sequence through a private
cache. Non-finite logits are never turned into tokens: they raise `NumericsError`. With
`tensor_parallel_size=N` this process is rank 0 and drives N-1 worker ranks (parallel/workers.py).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.config_fields import cfg_int
from anyquant.engine.engine import Engine, EngineConfig
from anyquant.engine.kv_cache import SequenceCache
from anyquant.engine.numerics import first_nonfinite_module
from anyquant.engine.sampling import SamplingParams
from anyquant.errors import AnyquantError, NumericsError
from anyquant.loading.loader import LoadedModel, load_model
from anyquant.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string), "length", "abort" or "error"
    logprobs: list[dict[int, float]] | None = field(default=None)
    error: str | None = None


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
        max_num_seqs: int = 64,
        kv_cache_gb: float | None = None,
        tp_timeout_s: float | None = None,
        kv_cache_fraction: float | None = None,
    ) -> None:
        """`debug_numerics`: when logits are not finite, replay with per-layer checks and name the
        first layer whose output overflowed (costs nothing until a failure).

        `tensor_parallel_size=N > 1`: N ranks (gloo on CPU, NCCL on CUDA), each holding 1/N of the
        split layers; this process starts N-1 worker processes running the package's own entry
        point (the caller's script is never re-imported: no `if __name__ == "__main__":` needed;
        they end with this process, however it ends), or torchrun started every rank when its
        environment variables are set (then only rank 0 returns from here; the other ranks serve
        it and exit). Each rank uses cores / N torch threads, this process included.
        `tp_timeout_s`: how long a collective waits for a silent rank before failing (default 30).
        KV cache: `kv_cache_gb` GiB, or `kv_cache_fraction` of the memory free after loading
        (capped at what `max_num_seqs` full-length sequences need); default: room for those
        sequences up to 2 GiB."""
        if tensor_parallel_size < 1:
            raise AnyquantError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
        self.debug_numerics = debug_numerics
        self._tp: Any = None
        if tensor_parallel_size > 1:
            self.loaded, self._tp = _start_tensor_parallel(
                model, device, dtype, kernel, tensor_parallel_size, tp_timeout_s
            )
            self._closer = weakref.finalize(self, self._tp.close)
            self.model: Any = self._tp
        else:
            self.loaded = load_model(model, device=device, dtype=dtype, kernel=kernel)
            self.model = self.loaded.model
        self.device = self.loaded.device
        self.dtype = self.loaded.compute_dtype
        limit = cfg_int(self.loaded.config, "max_position_embeddings", 2048)
        if max_model_len is not None and max_model_len > limit:
            raise AnyquantError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}"
            )
        self.max_model_len = max_model_len or limit
        self.tokenizer: Tokenizer | None = None
        from anyquant.loading.gguf_checkpoint import GgufCheckpoint

        ckpt = self.loaded.checkpoint
        if isinstance(ckpt, GgufCheckpoint):  # a lone .gguf carries its tokenizer in its metadata
            self.tokenizer = Tokenizer.from_gguf(ckpt.gguf.metadata, ckpt.path, self.loaded.config)
        elif (Path(model) / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer(model, self.loaded.config)
        self.engine = Engine(
            self.model,
            self.tokenizer,
            EngineConfig(
                max_model_len=self.max_model_len,
                max_num_seqs=max_num_seqs,
                kv_cache_gb=kv_cache_gb,
                kv_cache_fraction=kv_cache_fraction,
            ),
            self.dtype,
            self.device,
        )

    def close(self) -> None:
        """Stop tensor-parallel workers now (otherwise when this object is collected); no-op at N=1."""
        if self._tp is not None:
            self._closer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scoring -----------------------------------------------------------------------------
    def _check_length(self, n: int) -> None:
        if n > self.max_model_len:
            raise AnyquantError(f"sequence of {n} tokens exceeds max_model_len={self.max_model_len}")
        if n == 0:
            raise AnyquantError("empty prompt: at least one token is needed")

    def logits(self, token_ids: list[int]) -> Tensor:
        """Teacher-forced fp32 logits [T, vocab] at every position."""
        ids = list(token_ids)
        self._check_length(len(ids))
        logits = SequenceCache(self.model, len(ids), self.dtype, self.device).forward(ids, 0)
        # One reduction: all-NaN logits would otherwise make argmax answer token 0 forever.
        if not bool(torch.isfinite(logits).all()):
            raise self._nonfinite_error(ids)
        return logits.cpu()

    def _nonfinite_error(self, ids: list[int]) -> NumericsError:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.debug_numerics:
            seq = SequenceCache(self.model, len(ids), self.dtype, self.device)
            layer = first_nonfinite_module(self.loaded.model, lambda: seq.forward(ids, 0))
            where = f"; first non-finite output: {layer}" if layer else ""
        else:
            where = "; run with debug_numerics=True (--debug-numerics) to name the first overflowing layer"
        return NumericsError(
            f"non-finite logits for a sequence of {len(ids)} tokens with compute dtype {dtype}{where}. "
            f"The activations overflowed {dtype}; use dtype='float32' or 'bfloat16'"
        )

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
        """Generate for every prompt, batched continuously; outputs in the order of the prompts."""
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
        ids_of: dict[str, int] = {}
        for i, (_, ids) in enumerate(requests):
            self._check_length(len(ids))
            # Cap max_tokens at what the context leaves, as vLLM's offline API does.
            room = self.max_model_len - len(ids)
            if room < 1:
                raise AnyquantError(
                    f"prompt of {len(ids)} tokens leaves no room in max_model_len={self.max_model_len}"
                )
            capped = replace(params, max_tokens=min(params.max_tokens, room))
            ids_of[self.engine.add_request(ids, capped)] = i
        texts = [""] * len(requests)
        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[dict[int, float]]] = [[] for _ in requests]
        finish: list[tuple[str, str | None]] = [("length", None)] * len(requests)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                i = ids_of[delta.request_id]
                texts[i] += delta.new_text
                tokens[i] += delta.new_token_ids
                logprobs[i] += delta.logprobs
                if delta.finished:
                    finish[i] = (delta.finish_reason or "stop", delta.error)
        failed = [i for i, (reason, _) in enumerate(finish) if reason == "error"]
        if failed:
            i = failed[0]
            error = finish[i][1] or "unknown error"
            if "non-finite" in error:
                raise self._nonfinite_error(requests[i][1] + tokens[i])
            raise AnyquantError(f"request {i} failed: {error}")
        return [
            RequestOutput(
                prompt,
                ids,
                texts[i],
                tokens[i],
                finish[i][0],
                logprobs[i] if params.logprobs is not None else None,
            )
            for i, (prompt, ids) in enumerate(requests)
        ]


def _start_tensor_parallel(
    model: str | Path, device: str, dtype: str, kernel: str | None, world: int, timeout_s: float | None
) -> tuple[LoadedModel, Any]:
    """Check the split from headers first (a refusal needs no processes), then start the ranks."""
    from anyquant.loading.describe import check_tensor_parallel
    from anyquant.parallel.state import DEFAULT_TIMEOUT_S
    from anyquant.parallel.workers import LoadRequest, start_tensor_parallel

    check_tensor_parallel(model, world)
    request = LoadRequest(
        str(Path(model).resolve()),
        device,
        dtype,
        kernel,
        DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
        max(1, torch.get_num_threads() // world),
    )
    return start_tensor_parallel(request, world)
