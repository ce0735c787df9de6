"""`LLM`: load a checkpoint once, then generate text, score tokens and measure perplexity.

Owns the user-facing offline API (vLLM-like names). Generation runs on the same `Engine` as the
server (continuous batching over a paged KV cache); scoring runs one sequence through a private
cache. Non-finite logits are never turned into tokens: they raise `NumericsError`. With
`tensor_parallel_size=N` this process is rank 0 and drives N-1 worker ranks (workers/).
Vision-language models take images as vLLM does: a prompt `{"prompt": ..., "multi_modal_data":
{"image": PIL image or list}}` with one placeholder per image in the text.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.chat_template import load_override
from anyquant.config_fields import cfg_int
from anyquant.engine.capture import eager_by_environment
from anyquant.engine.engine import Engine, EngineConfig
from anyquant.engine.fp16_guard import Fp16Report, warm_up_fp16
from anyquant.engine.kv_cache import SequenceCache
from anyquant.engine.multimodal import MultimodalPrompt, one_off_cross_step, prepare_prompt
from anyquant.engine.numerics import first_nonfinite_module
from anyquant.engine.request import invalid_token_id
from anyquant.engine.sampling import SamplingParams
from anyquant.engine.scoring import prompt_logprobs
from anyquant.errors import AnyquantError, NumericsError
from anyquant.layers.kv_quant import KV_CACHE_DTYPES, cache_dtype
from anyquant.loading.dtype_policy import needs_fp16_guard, overflow_advice
from anyquant.loading.loader import LoadedModel, load_model, trained_dtype
from anyquant.models.base import InputEmbeds
from anyquant.models.multimodal import ImageEncoder, ImageInputError, ImageProcessor, MultimodalModel
from anyquant.models.protocol import EngineModel
from anyquant.tokenizer import Tokenizer
from anyquant.utils.devices import resolve_device

log = logging.getLogger("anyquant")

# A prompt: text, or vLLM's dict form {"prompt" | "prompt_token_ids": ..., "multi_modal_data": ...}.
PromptType = str | dict[str, Any]


@dataclass
class CompletionOutput:
    """One sample of a prompt (vLLM's name); `index` is its place among the prompt's n samples."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string), "length", "abort" or "error"
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """A prompt's result. `text`, `token_ids`, `finish_reason` and `logprobs` are those of its first
    sample; `outputs` holds all n (vLLM's layout). `prompt_logprobs[i]` is the distribution that
    predicted prompt token i (None for the first token), when asked for."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string), "length", "abort" or "error"
    logprobs: list[dict[int, float]] | None = field(default=None)
    error: str | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0


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
        chat_template: str | None = None,
        merge_projections: bool = True,
        lm_head_dtype: str = "auto",
        activation_dtype: str = "auto",
        mmproj: str | Path | None = None,
        enforce_eager: bool | None = None,
        enable_expert_parallel: bool = False,
        kv_cache_dtype: str = "auto",
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
        sequences up to 2 GiB.
        `chat_template`: a template file, or the template itself, used by `chat` instead of the
        checkpoint's own (vLLM's `--chat-template`).
        `merge_projections=False` keeps q/k/v and gate/up as separate kernel calls (same logits;
        for measuring what merging gains).
        `lm_head_dtype="int8"` quantizes an unquantized LM head per row at load: half its bytes per
        decode token, at a small perplexity cost (benchmarks/RESULTS.md); "int4" per group of a
        row (loading/lm_head.py): about a quarter of its bytes, at a larger cost; "auto" keeps it
        as stored.
        `activation_dtype="int8"` quantizes the activations of weight-only (W4A16, W8A16) layers per
        token, so they run on int8 dot products (AVX512-VNNI); it changes results slightly
        (benchmarks/RESULTS.md); "auto" runs every layer as its checkpoint specifies.

        `mmproj`: llama.cpp's vision projector file for a GGUF language model (llama.cpp's
        `--mmproj`); a directory holding the model and one `mmproj*.gguf` finds it alone.

        `enable_expert_parallel=True` (vLLM's name): with `tensor_parallel_size=N`, each rank holds
        whole routed experts (about E/N of them) instead of a slice of every expert; attention, dense
        and shared-expert layers stay tensor-parallel. Refused for a model without MoE layers.

        `kv_cache_dtype="int8"` (vLLM's `--kv-cache-dtype`, llama.cpp's `--cache-type-k q8_0`) keeps
        each cached key and value row as int8 codes and one fp32 scale per token and KV head
        (layers/kv_quant.py): about half the bytes per token of a bf16 cache, so the same
        `kv_cache_gb` holds about twice the tokens, at a small accuracy cost (benchmarks/RESULTS.md).
        "auto" keeps the cache in the compute dtype. Refused for latent-attention (MLA) families."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise AnyquantError(
                f"kv_cache_dtype {kv_cache_dtype!r} is not supported; choose one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if tensor_parallel_size < 1:
            raise AnyquantError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
        resolve_device(device)  # CUDA asked for but unusable: fail before reading or starting anything
        self.debug_numerics = debug_numerics
        self._tp: Any = None
        if tensor_parallel_size > 1:
            self.loaded, self._tp = _start_tensor_parallel(
                model,
                device,
                dtype,
                kernel,
                tensor_parallel_size,
                tp_timeout_s,
                merge_projections,
                lm_head_dtype,
                activation_dtype,
                mmproj,
                enable_expert_parallel,
            )
            self._closer = weakref.finalize(self, self._tp.close)
            self.model: EngineModel = self._tp
        else:
            self.loaded = load_model(
                model,
                device=device,
                dtype=dtype,
                kernel=kernel,
                merge_projections=merge_projections,
                lm_head_dtype=lm_head_dtype,
                activation_dtype=activation_dtype,
                mmproj=mmproj,
                expert_parallel=enable_expert_parallel,
            )
            self.model = self.loaded.model
        self.device = self.loaded.device
        self.dtype = self.loaded.compute_dtype
        # The KV cache's dtype (the engine's and every `SequenceCache` of `logits`): the compute
        # dtype, or int8 rows.
        self.cache_dtype = cache_dtype(kv_cache_dtype, self.dtype)
        archs = self.loaded.config.get("architectures") or [type(self.loaded.model).__name__]
        self.loaded.model.cache_shape.check_cache_dtype(self.cache_dtype, str(archs[0]))
        # The fp16 policy (engine/fp16_guard.py): range guards and an overflow check at warm-up.
        self.fp16_report: Fp16Report | None = None
        if tensor_parallel_size == 1 and needs_fp16_guard(self.dtype, trained_dtype(self.loaded.config)):
            self.fp16_report = warm_up_fp16(self.loaded, debug_numerics)
        limit = cfg_int(self.loaded.config, "max_position_embeddings", 2048)
        if max_model_len is not None and max_model_len > limit:
            raise AnyquantError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}"
            )
        self.max_model_len = max_model_len or limit
        self.path = Path(model)
        self._image_processor: ImageProcessor | None = None
        self.tokenizer: Tokenizer | None = None
        from anyquant.loading.gguf_checkpoint import GgufCheckpoint

        ckpt = self.loaded.checkpoint
        if isinstance(ckpt, GgufCheckpoint):  # a lone .gguf carries its tokenizer in its metadata
            self.tokenizer = Tokenizer.from_gguf(
                ckpt.gguf.metadata, ckpt.path, self.loaded.config, chat_template=chat_template
            )
        elif (Path(model) / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer(model, self.loaded.config, chat_template=chat_template)
        elif chat_template is not None:
            raise AnyquantError(f"{model}: chat_template given but the model directory has no tokenizer.json")
        self.engine = Engine(
            self.model,
            self.tokenizer,
            EngineConfig(
                max_model_len=self.max_model_len,
                max_num_seqs=max_num_seqs,
                kv_cache_gb=kv_cache_gb,
                kv_cache_fraction=kv_cache_fraction,
                kv_cache_dtype=kv_cache_dtype,
            ),
            self.dtype,
            self.device,
        )
        if enforce_eager is None:
            enforce_eager = eager_by_environment()
        self.enforce_eager = enforce_eager
        # Why decode steps run eagerly ("enforce_eager" when asked), or None when compiled.
        self.eager_reason: str | None = "enforce_eager" if enforce_eager else None
        if not enforce_eager:
            start = time.perf_counter()
            self.eager_reason = self.engine.runner.capture(self.max_model_len - 1, max_num_seqs)
            self.loaded.timings["compiling"] = time.perf_counter() - start
            log.info("%s: phase compiling took %.2fs", model, self.loaded.timings["compiling"])

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

    def logits(self, token_ids: list[int], multi_modal_data: dict[str, Any] | None = None) -> Tensor:
        """Teacher-forced fp32 logits [T, vocab] at every position. With images
        (`multi_modal_data={"image": ...}`), at the prompt's expanded placeholders."""
        ids, mm = self.prepare_multimodal(list(token_ids), multi_modal_data)
        self._check_length(len(ids))
        bad = invalid_token_id(ids, self.engine.prompt_vocab_size)
        if bad is not None:
            raise AnyquantError(bad)
        return self._forward_prompt(ids, mm)

    def _forward_prompt(self, ids: list[int], mm: MultimodalPrompt | None) -> Tensor:
        """Teacher-forced fp32 logits (on the CPU) of a prepared prompt (images already laid out
        in `mm`); non-finite logits are a NumericsError."""
        seq = SequenceCache(self.model, len(ids), self.cache_dtype, self.device, compute_dtype=self.dtype)
        if mm is None:
            logits = seq.forward(ids, 0)
        else:
            model = self.loaded.model
            assert isinstance(model, ImageEncoder), "a prompt with images reached a model that takes none"
            values = torch.cat(model.embed_images(mm.images))
            if mm.cross is not None:  # a cross-attention family: images are no prompt rows
                logits = seq.forward(ids, 0, cross=one_off_cross_step(mm, values, len(ids)))
            else:
                rows = torch.cat([torch.arange(start, start + n) for start, n in mm.spans])
                logits = seq.forward(ids, 0, None, mm.positions, InputEmbeds(rows.to(values.device), values))
        # One reduction: all-NaN logits would otherwise make argmax answer token 0 forever.
        if not bool(torch.isfinite(logits).all()):
            raise self._nonfinite_error(ids)
        return logits.cpu()

    def _nonfinite_error(self, ids: list[int]) -> NumericsError:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.debug_numerics:
            seq = SequenceCache(self.model, len(ids), self.cache_dtype, self.device, compute_dtype=self.dtype)
            layer = first_nonfinite_module(self.loaded.model, lambda: seq.forward(ids, 0))
            where = f"; first non-finite output: {layer}" if layer else ""
        else:
            where = "; run with debug_numerics=True (--debug-numerics) to name the first overflowing layer"
        return NumericsError(
            f"non-finite logits for a sequence of {len(ids)} tokens with compute dtype {dtype}{where}. "
            f"The activations overflowed {dtype}; use dtype {overflow_advice(self.device)}"
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

    # -- images ------------------------------------------------------------------------------
    @property
    def takes_images(self) -> bool:
        return isinstance(self.loaded.model, MultimodalModel)

    def image_processor(self) -> ImageProcessor:
        """The checkpoint's image preprocessing; raises for a model that takes no images."""
        if self._image_processor is None:
            model = self.loaded.model
            if not isinstance(model, MultimodalModel):
                raise ImageInputError(f"this model ({type(model).__name__}) takes no images")
            self._image_processor = model.image_processor(self.path)
        return self._image_processor

    def prepare_multimodal(
        self, token_ids: list[int], multi_modal_data: dict[str, Any] | None
    ) -> tuple[list[int], MultimodalPrompt | None]:
        """Preprocess the images of `multi_modal_data` and expand the prompt's placeholders."""
        if not multi_modal_data:
            return token_ids, None
        unknown = sorted(set(multi_modal_data) - {"image"})
        if unknown:
            raise ImageInputError(f"multi_modal_data: {unknown} not supported; only 'image' is")
        images = multi_modal_data["image"]
        images = list(images) if isinstance(images, list | tuple) else [images]
        return prepare_prompt(self.image_processor(), token_ids, images)

    # -- generation --------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise AnyquantError("this model directory has no tokenizer.json; pass prompt_token_ids instead")
        return self.tokenizer.encode(text)

    def generate(
        self,
        prompts: PromptType | list[PromptType] | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched continuously; outputs in the order of the prompts.
        With `n > 1`, sample i of a seeded request uses seed + i (as the server does).
        A prompt is text or a dict `{"prompt": text | "prompt_token_ids": ids,
        "multi_modal_data": {"image": PIL image or list}}`."""
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        requests: list[tuple[str | None, list[int], MultimodalPrompt | None]]
        if prompt_token_ids is not None:
            requests = [(None, list(ids), None) for ids in prompt_token_ids]
        elif prompts is not None:
            requests = [self._request_of(p) for p in prompts]
        else:
            raise AnyquantError("generate() needs prompts or prompt_token_ids")
        samples = self._run_requests([(ids, mm) for _, ids, mm in requests], params)
        outputs = []
        for i, (prompt, ids, mm) in enumerate(requests):
            mine = samples[i * params.n : (i + 1) * params.n]
            first = mine[0][0]
            outputs.append(
                RequestOutput(
                    prompt,
                    ids,
                    first.text,
                    first.token_ids,
                    first.finish_reason,
                    first.logprobs,
                    outputs=[out for out, _ in mine],
                    prompt_logprobs=self._prompt_logprobs(ids, mm, params.prompt_logprobs),
                    num_cached_tokens=mine[0][1],
                )
            )
        return outputs

    def _run_requests(
        self, prompts: list[tuple[list[int], MultimodalPrompt | None]], params: SamplingParams
    ) -> list[tuple[CompletionOutput, int]]:
        """Every prompt's n samples (prompt-major) with the prompt tokens the prefix cache served."""
        order: dict[str, int] = {}
        for ids, mm in prompts:
            self._check_length(len(ids))
            # Cap max_tokens at what the context leaves, as vLLM's offline API does.
            room = self.max_model_len - len(ids)
            if room < 1:
                raise AnyquantError(
                    f"prompt of {len(ids)} tokens leaves no room in max_model_len={self.max_model_len}"
                )
            max_tokens = min(params.max_tokens, room)
            for k in range(params.n):
                seed = None if params.seed is None else (params.seed + k) % 2**64
                one = replace(
                    params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens), seed=seed
                )
                try:
                    rid = self.engine.add_request(ids, one, multimodal=mm)
                except ValueError as exc:
                    for added in order:
                        self.engine.abort(added)
                    raise AnyquantError(str(exc)) from exc
                order[rid] = len(order)
        texts = [""] * len(order)
        tokens: list[list[int]] = [[] for _ in order]
        logprobs: list[list[dict[int, float]]] = [[] for _ in order]
        cached = [0] * len(order)
        finish: list[tuple[str, str | None]] = [("length", None)] * len(order)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                i = order[delta.request_id]
                texts[i] += delta.new_text
                tokens[i] += delta.new_token_ids
                logprobs[i] += delta.logprobs
                if delta.finished:
                    finish[i] = (delta.finish_reason or "stop", delta.error)
                    cached[i] = delta.num_cached_tokens
        failed = [i for i, (reason, _) in enumerate(finish) if reason == "error"]
        if failed:
            i = failed[0]
            error = finish[i][1] or "unknown error"
            if "non-finite" in error:
                raise self._nonfinite_error(prompts[i // params.n][0] + tokens[i])
            raise AnyquantError(f"request {i // params.n} failed: {error}")
        return [
            (
                CompletionOutput(
                    i % params.n,
                    texts[i],
                    tokens[i],
                    finish[i][0],
                    logprobs[i] if params.logprobs is not None else None,
                ),
                cached[i],
            )
            for i in range(len(order))
        ]

    def _prompt_logprobs(
        self, ids: list[int], mm: MultimodalPrompt | None, k: int | None
    ) -> list[dict[int, float] | None] | None:
        """vLLM's prompt_logprobs: for each prompt token after the first, its logprob under the
        teacher-forced model, then the top-k (one scoring pass over the prompt)."""
        if k is None:
            return None
        return prompt_logprobs(self._forward_prompt(ids, mm), ids, k).entries

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: render each conversation (OpenAI-style messages, optional `tools`)
        with the model's chat template, or `chat_template` (a template file or the template
        itself), and generate. The rendering is the server's: the same request gives the same
        prompt, and with the same sampling parameters the same tokens."""
        from anyquant.chat import OFFLINE_IMAGE_PARTS, ChatInputError, image_parts_of, render_chat

        if self.tokenizer is None:
            raise AnyquantError("chat() needs tokenizer files (tokenizer.json) in the model directory")
        conversations: list[list[dict[str, Any]]]
        if messages and isinstance(messages[0], list):
            conversations = [list(c) for c in messages if isinstance(c, list)]
        else:
            conversations = [[m for m in messages if isinstance(m, dict)]]
        template = load_override(chat_template) if chat_template is not None else None
        texts: list[str] = []
        prompts: list[PromptType] = []
        for conversation in conversations:
            try:
                text = render_chat(
                    self.tokenizer,
                    conversation,
                    tools,
                    add_generation_prompt,
                    template,
                    chat_template_kwargs,
                    continue_final_message,
                    OFFLINE_IMAGE_PARTS,
                )
            except ChatInputError as exc:
                raise AnyquantError(str(exc)) from exc
            # The template writes any BOS itself, so none is added here (as the server does).
            texts.append(text)
            prompt: dict[str, Any] = {
                "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)
            }
            images = [self._chat_image(part, where) for where, part in image_parts_of(conversation)]
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        outputs = self.generate(prompts, sampling_params=sampling_params)
        for out, text in zip(outputs, texts):
            out.prompt = text
        return outputs

    def _chat_image(self, part: dict[str, Any], where: str) -> Any:
        """A chat image part as a PIL image: vLLM's `image_pil` as given, an `image_url` (data: URL
        or file://, which offline use may read anywhere) decoded within the server's size limits."""
        from anyquant.models.media import MediaLimits, image_url_of, load_image

        if part.get("type") == "image_pil":
            return part.get("image_pil")
        try:
            return load_image(image_url_of(part, where), MediaLimits(allowed_local_path=Path("/")), where)
        except ImageInputError as exc:
            raise AnyquantError(str(exc)) from exc

    def _request_of(self, prompt: PromptType) -> tuple[str | None, list[int], MultimodalPrompt | None]:
        if isinstance(prompt, str):
            return prompt, self._encode(prompt), None
        if not isinstance(prompt, dict):
            raise AnyquantError(f"a prompt is a string or a dict, got {type(prompt).__name__}")
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"})
        if unknown:
            raise AnyquantError(f"prompt dict: unknown keys {unknown}")
        text = prompt.get("prompt")
        if text is not None:
            ids = self._encode(str(text))
        elif prompt.get("prompt_token_ids") is not None:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
        else:
            raise AnyquantError("prompt dict: give 'prompt' or 'prompt_token_ids'")
        ids, mm = self.prepare_multimodal(ids, prompt.get("multi_modal_data"))
        return text, ids, mm


def _start_tensor_parallel(
    model: str | Path,
    device: str,
    dtype: str,
    kernel: str | None,
    world: int,
    timeout_s: float | None,
    merge_projections: bool,
    lm_head_dtype: str,
    activation_dtype: str,
    mmproj: str | Path | None,
    expert_parallel: bool,
) -> tuple[LoadedModel, Any]:
    """Check the split from headers first (a refusal needs no processes), then start the ranks."""
    from anyquant.loading.activations import activation_quant
    from anyquant.loading.describe import check_tensor_parallel
    from anyquant.loading.lm_head import lm_head_spec
    from anyquant.parallel.state import DEFAULT_TIMEOUT_S
    from anyquant.workers.rank_zero import start_tensor_parallel
    from anyquant.workers.worker import LoadRequest

    lm_head_spec(lm_head_dtype)  # a bad value fails before any process starts
    activation_quant(activation_dtype)
    check_tensor_parallel(model, world, mmproj, expert_parallel)
    request = LoadRequest(
        str(Path(model).resolve()),
        device,
        dtype,
        kernel,
        DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
        max(1, torch.get_num_threads() // world),
        merge_projections,
        lm_head_dtype,
        activation_dtype,
        None if mmproj is None else str(Path(mmproj).resolve()),
        expert_parallel,
    )
    return start_tensor_parallel(request, world)
