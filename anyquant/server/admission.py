"""Admission: a validated request body -> engine items, or the `ApiError` that says why not.

Owns the checks a request passes before the engine sees it: the served model's name,
tokenization, the vocabulary, the context length and the KV cache's room, n x prompts against
what the engine holds at once, top logprobs; the chat template (the model's, or a trusted
request's); images in chat messages (within the media limits); output constraints (compiled here,
off the event loop); and what tool calling adds to each item. Every refusal is a 400 naming the
parameter.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from anyquant.chat import ChatInputError, render_chat
from anyquant.engine.async_engine import GenerationItem
from anyquant.engine.engine import Engine
from anyquant.engine.grammar import GuidedDecodingError
from anyquant.engine.multimodal import MultimodalPrompt, prepare_prompt
from anyquant.engine.sampling import GuidedDecodingParams
from anyquant.models.media import image_url_of, load_image
from anyquant.models.multimodal import ImageInputError, ImageProcessor
from anyquant.server.config import ServerConfig
from anyquant.server.errors import ApiError
from anyquant.server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeChatRequest
from anyquant.server.tools import ToolPlan
from anyquant.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prepared:
    """A request turned into engine items: one per (prompt, choice), in OpenAI's index order."""

    items: list[GenerationItem]
    num_prompt_tokens: int  # each distinct prompt counted once, as OpenAI's usage does


class Admission:
    """The checks of one server: its config, its model's limits, and what the engine holds."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        config: ServerConfig,
        image_processor: ImageProcessor | None,
        capacity: int,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor  # None: the model takes no images
        self.max_model_len = engine.config.max_model_len
        self.vocab_size = engine.vocab_size
        self.prompt_vocab_size = engine.prompt_vocab_size  # may exceed it (mllama's <|image|>)
        self.num_pages = engine.num_kv_pages
        self.page_size = engine.page_size
        self.capacity = capacity  # sequences admitted at once (running + waiting)
        self.grammars = engine.grammars  # thread-safe: requests' grammars compile off the event loop

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.config.served_model_name!r}",
                "not_found_error",
                "model",
            )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # e.g. lone surrogates, which have no UTF-8 form
            raise ApiError(400, f"the prompt cannot be tokenized: {exc}", param="prompt") from exc
        if not ids:
            raise ApiError(
                400, "the prompt is empty after tokenization; at least one token is needed", param="prompt"
            )
        return ids

    def check_ids(self, ids: list[int]) -> None:
        limit = self.prompt_vocab_size
        bad = next((t for t in ids if t >= limit), None)
        if bad is not None:
            raise ApiError(
                400, f"prompt token id {bad} is outside the vocabulary [0, {limit})", param="prompt"
            )

    def max_tokens_for(self, num_prompt: int, requested: int | None) -> int:
        """The request's max_tokens after checking it against the context and the KV cache."""
        limit = self.max_model_len
        if num_prompt >= limit:
            raise ApiError(
                400,
                f"this model's maximum context length is {limit} tokens and the prompt has {num_prompt} "
                "tokens, which leaves no room for output; shorten the prompt",
                param="prompt",
            )
        max_tokens = limit - num_prompt if requested is None else requested
        if num_prompt + max_tokens > limit:
            raise ApiError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has {num_prompt} "
                f"tokens and max_tokens is {max_tokens} ({num_prompt + max_tokens} in all); lower "
                f"max_tokens to at most {limit - num_prompt} or shorten the prompt",
                param="max_tokens",
            )
        pages = -(-(num_prompt + max_tokens) // self.page_size)
        if pages > self.num_pages:
            raise ApiError(
                400,
                f"the KV cache holds {self.num_pages} pages of {self.page_size} tokens "
                f"({self.num_pages * self.page_size} tokens) and this request needs up to "
                f"{num_prompt + max_tokens}; lower max_tokens or shorten the prompt",
                param="max_tokens",
            )
        return max_tokens

    def prepare(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        requested: int | None,
        logprobs: int | None,
        multimodal: MultimodalPrompt | None = None,
        guided: GuidedDecodingParams | None = None,
    ) -> Prepared:
        """`multimodal`: the images of the (single) prompt."""
        total = len(prompts) * body.n
        if total > self.capacity:
            raise ApiError(
                400,
                f"{len(prompts)} prompt(s) x n={body.n} = {total} sequences; this server holds at most "
                f"{self.capacity} at once",
                param="n",
            )
        if logprobs is not None and logprobs > self.vocab_size:
            raise ApiError(
                400, f"{logprobs} top logprobs asked for a vocabulary of {self.vocab_size}", param="logprobs"
            )
        items = []
        for ids in prompts:
            self.check_ids(ids)
            max_tokens = self.max_tokens_for(len(ids), requested)
            for index in range(body.n):
                try:
                    params = body.sampling_params(max_tokens, index, logprobs, guided)
                except ValueError as exc:
                    raise ApiError(400, str(exc)) from exc
                items.append(GenerationItem(ids, params, multimodal))
        return Prepared(items, sum(len(ids) for ids in prompts))

    async def guided(self, body: CompletionRequest | ChatCompletionRequest) -> GuidedDecodingParams | None:
        """The request's output constraint, compiled now on a worker thread (the engine then finds
        it in the cache): a bad schema, regex or grammar is this request's 400, and compiling never
        stalls the engine's steps."""
        try:
            asked = body.guided_decoding()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="response_format") from exc
        if asked is None:
            return None
        params, name = asked
        try:
            await asyncio.to_thread(self.grammars.compile, params)
        except GuidedDecodingError as exc:
            raise ApiError(400, f"{name}: {exc}", param=name) from exc
        return params

    def prepare_images(
        self, body: ChatCompletionRequest, prompt: list[int]
    ) -> tuple[list[int], MultimodalPrompt]:
        images = self.chat_images(body)
        assert self.image_processor is not None  # render_chat refused image parts for a text model
        try:
            return prepare_prompt(self.image_processor, prompt, images)
        except ImageInputError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from exc

    def chat_images(self, body: ChatCompletionRequest) -> list[Any]:
        """The messages' images, decoded within the limits (400 for any problem)."""
        parts = [(i, j, part) for i, m in enumerate(body.messages) for j, part in m.image_parts()]
        if not parts:
            return []
        limits = self.config.media
        if len(parts) > limits.max_images:
            raise ApiError(
                400, f"{len(parts)} images in one request; the limit is {limits.max_images}", param="messages"
            )
        images = []
        for i, j, part in parts:
            where = f"messages[{i}].content[{j}]"
            try:
                images.append(load_image(image_url_of(part, where), limits, where))
            except ImageInputError as exc:
                raise ApiError(400, str(exc), param="messages") from exc
        return images

    def check_body(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self.check_model(body.model)
        problem = body.unsupported()
        if problem:
            raise ApiError(400, problem)

    def render_chat(
        self, body: ChatCompletionRequest | TokenizeChatRequest, tools: list[dict[str, Any]] | None
    ) -> str:
        if self.image_processor is None and any(m.image_parts() for m in body.messages):
            raise ApiError(400, "this model takes no images; send text parts only", param="messages")
        chat_template = body.chat_template
        if chat_template is not None and not self.config.trust_request_chat_template:
            raise ApiError(
                400,
                "this server does not take chat templates from requests (start it with "
                "--trust-request-chat-template to allow them); it uses the model's or --chat-template",
                param="chat_template",
            )
        if not (chat_template or self.tokenizer.chat_templates):
            raise ApiError(
                400,
                "this model has no chat template (chat_template.jinja, chat_template.json or "
                "tokenizer_config.json) and the server was started without --chat-template; use "
                "/v1/completions or send chat_template",
            )
        try:
            return render_chat(
                self.tokenizer,
                [m.model_dump(exclude_none=True) for m in body.messages],
                tools,
                body.add_generation_prompt,
                chat_template,
                body.chat_template_kwargs,
                body.continue_final_message,
            )
        except ChatInputError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        except Exception as exc:  # the template is checkpoint data: any failure is this request's
            raise ApiError(
                400, f"the chat template failed for these messages: {exc}", param="messages"
            ) from exc


def with_tools(prepared: Prepared, tools: ToolPlan) -> Prepared:
    """The items with what tool calling needs: the call grammar of `required` / named choices, and
    special tokens kept in the text when the format's markers are special tokens."""
    items = [
        GenerationItem(
            item.prompt_token_ids,
            replace(
                item.params,
                guided_decoding=tools.guided or item.params.guided_decoding,
                skip_special_tokens=item.params.skip_special_tokens and tools.skip_special_tokens,
            ),
            item.multimodal,
        )
        for item in prepared.items
    ]
    return Prepared(items, prepared.num_prompt_tokens)
