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

Cross-attention families (`MultimodalPrompt.cross`): an image's placeholder stays one token and
gets no rows; the runner hands the model the images' encoder rows with the request's first step.
Every token of such a prompt depends on its images (the reference lets tokens before the first
image attend all of them), so the first key already stands for all of the prompt's images.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from anyquant.models.multimodal import (
    CrossAttentionStep,
    CrossImage,
    CrossSequence,
    ImageInput,
    ImageInputError,
    ImageProcessor,
)

if TYPE_CHECKING:
    from anyquant.engine.request import Request


@dataclass(frozen=True, eq=False)
class MultimodalPrompt:
    images: list[ImageInput]
    spans: list[tuple[int, int]]  # per image: (first placeholder index, placeholder count)
    positions: Tensor | None  # [rows, P] positions of the prompt's tokens; None: 0..P-1
    position_delta: int  # tokens after the prompt sit at index + delta (every row)
    num_prompt_tokens: int
    # Cross-attention families: which tokens attend which image (None: images are prompt rows).
    cross: tuple[CrossImage, ...] | None = None

    def cache_key_ids(self, prompt_ids: list[int]) -> list[int]:
        """The prompt ids with each image's placeholders replaced by a negative value drawn from
        the image's digest (token ids are never negative, so no text can collide with it)."""
        keys = list(prompt_ids)
        for image, (start, length) in zip(self.images, self.spans):
            value = -1 - int.from_bytes(image.digest[:7], "little")
            keys[start : start + length] = [value] * length
        if self.cross is not None:
            h = hashlib.blake2b(b"".join(im.digest for im in self.images), digest_size=7)
            h.update(str(keys[0]).encode())
            keys[0] = -1 - int.from_bytes(h.digest(), "little")
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
        out: list[tuple[int, Tensor]] = []
        if self.cross is not None:  # images reach the model through cross-attention
            return out
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
    cross = processor.cross_images(ids, inputs)
    return ids, MultimodalPrompt(
        inputs, spans, positions, delta, len(ids), None if cross is None else tuple(cross)
    )


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
        if rows.shape[0] != image.num_rows:
            raise ValueError(
                f"the encoder yielded {rows.shape[0]} rows for an image of {image.num_rows} rows"
            )
        size = rows.numel() * rows.element_size()
        if size <= self.max_bytes:
            while self._entries and self._bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
            self._entries[image.digest] = rows
            self._bytes += size
        return rows


# Keys are unique in the process: engines that share a model never confuse their requests' states.
_CROSS_KEYS = itertools.count()


class CrossAttentionRequests:
    """The running requests whose cross-attention state lives in the model, by key.

    A request gets its key, and the model its images' encoder rows, on its first step; the state
    stays through preemption (it depends on the images only, so a recomputed prefill reuses it)
    and is released in the first step after the request finished."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[Request, int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> set[int]:
        return {key for _, key in self._keys.values()}

    def sequence(
        self, request: Request, first_row: int, count: int, embed: Callable[[ImageInput], Tensor]
    ) -> CrossSequence:
        mm = request.multimodal
        assert mm is not None and mm.cross is not None
        start = request.num_computed_tokens
        entry = self._keys.get(request.request_id)
        if entry is not None:
            return CrossSequence(entry[1], first_row, count, start)
        key = next(_CROSS_KEYS)
        self._keys[request.request_id] = (request, key)
        states = torch.cat([embed(image) for image in mm.images])
        return CrossSequence(key, first_row, count, start, mm.cross, states)

    def take_finished(self) -> tuple[int, ...]:
        """Keys of the finished requests, forgotten here (the caller frees them in the model)."""
        done = [rid for rid, (request, _) in self._keys.items() if request.is_finished]
        return tuple(self._keys.pop(rid)[1] for rid in done)


def one_off_cross_step(mm: MultimodalPrompt, states: Tensor, num_tokens: int) -> CrossAttentionStep:
    """The cross-attention input of one forward over a whole prompt (nothing kept)."""
    assert mm.cross is not None
    return CrossAttentionStep((CrossSequence(-1, 0, num_tokens, 0, mm.cross, states),))
