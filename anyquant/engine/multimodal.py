"""Images in a request: the prepared prompt, its prefix-cache keys, its positions, and the
encoder cache.

`prepare_prompt` turns token ids plus PIL images into the expanded token ids and a
`MultimodalPrompt` through the family's `ImageProcessor` (models/multimodal.py). While a request
is prefilled, the runner asks `step_embeddings` for the encoder rows that fall into the step's
chunk (an image cut by chunked prefill or by a prefix-cache hit is sliced, never re-laid) and
`step_positions` for its rotary positions. The encoder runs once per distinct image content:
`EncoderCache` keeps its outputs by content digest (least recently used out first).

Prefix caching: placeholder tokens are the same for every image, so the page keys use
`MultimodalPrompt.cache_key_ids`, where each image's placeholders are replaced by a value
derived from the image's digest; two requests share KV pages only when the images match too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anyquant.models.multimodal import ImageInput, ImageInputError, ImageProcessor


@dataclass(frozen=True, eq=False)
class MultimodalPrompt:
    images: list[ImageInput]
    spans: list[tuple[int, int]]  # per image: (first placeholder index, placeholder count)
    positions: Tensor | None  # [rows, P] positions of the prompt's tokens; None: 0..P-1
    position_delta: int  # tokens after the prompt sit at index + delta (every row)
    num_prompt_tokens: int

    def cache_key_ids(self, prompt_ids: list[int]) -> list[int]:
        """The prompt ids with each image's placeholders replaced by a negative value drawn from
        the image's digest (token ids are never negative, so no text can collide with it)."""
        keys = list(prompt_ids)
        for image, (start, length) in zip(self.images, self.spans):
            value = -1 - int.from_bytes(image.digest[:7], "little")
            keys[start : start + length] = [value] * length
        return keys

    def step_positions(self, start: int, count: int) -> Tensor:
        """[rows, count] positions of tokens start..start+count-1 (prompt ones, then generated)."""
        assert self.positions is not None
        prompt_end = self.num_prompt_tokens
        parts = []
        if start < prompt_end:
            parts.append(self.positions[:, start : min(start + count, prompt_end)])
        if start + count > prompt_end:
            first = max(start, prompt_end) + self.position_delta
            tail = torch.arange(first, start + count + self.position_delta)
            parts.append(tail.expand(self.positions.shape[0], -1))
        return torch.cat(parts, dim=1)

    def step_embeddings(
        self, start: int, count: int, embed: Callable[[ImageInput], Tensor]
    ) -> list[tuple[int, Tensor]]:
        """Encoder rows for tokens start..start+count-1: (offset in the chunk, rows) per image
        that overlaps it; `embed` returns an image's full [num_tokens, hidden] rows."""
        out = []
        for image, (first, length) in zip(self.images, self.spans):
            lo, hi = max(first, start), min(first + length, start + count)
            if lo < hi:
                out.append((lo - start, embed(image)[lo - first : hi - first]))
        return out


def prepare_prompt(
    processor: ImageProcessor, token_ids: list[int], images: list[Any]
) -> tuple[list[int], MultimodalPrompt]:
    """Preprocess `images` (PIL), expand the prompt's placeholders, compute its positions."""
    if not images:
        raise ImageInputError("no images given")
    inputs = [processor.process(image) for image in images]
    ids, spans = processor.expand_placeholders(list(token_ids), inputs)
    positions, delta = processor.prompt_positions(ids, inputs, spans)
    if positions is not None and positions.shape[-1] != len(ids):
        raise ValueError(f"the family's prompt positions cover {positions.shape[-1]} of {len(ids)} tokens")
    return ids, MultimodalPrompt(inputs, spans, positions, delta, len(ids))


class EncoderCache:
    """Encoder outputs by image digest, up to `max_bytes` (least recently used evicted first; an
    output larger than the whole budget is returned but not kept)."""

    def __init__(
        self, encode: Callable[[list[ImageInput]], list[Tensor]], max_bytes: int = 256 << 20
    ) -> None:
        self.encode = encode
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, Tensor] = OrderedDict()
        self._bytes = 0
        self.num_encoded = 0  # images run through the encoder (misses)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def embeddings(self, image: ImageInput) -> Tensor:
        rows = self._entries.get(image.digest)
        if rows is not None:
            self._entries.move_to_end(image.digest)
            return rows
        rows = self.encode([image])[0]
        self.num_encoded += 1
        if rows.shape[0] != image.num_tokens:
            raise ValueError(
                f"the encoder yielded {rows.shape[0]} rows for an image of {image.num_tokens} tokens"
            )
        size = rows.numel() * rows.element_size()
        if size <= self.max_bytes:
            while self._entries and self._bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
            self._entries[image.digest] = rows
            self._bytes += size
        return rows
