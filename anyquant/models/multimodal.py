"""The contract between a vision-language family and the engine.

A family that takes images provides two things:

- an `ImageProcessor` (built from the checkpoint directory by `model.image_processor(dir)`):
  it turns a PIL image into an `ImageInput` (the encoder's tensors, how many embeddings the
  image yields, a content digest), names the placeholder token that stands for an image in the
  prompt, and may compute special positions for a prompt with images (`prompt_positions`, the
  hook M-RoPE families use; the default is plain 1-D positions);
- `model.embed_images(images) -> [num_tokens, hidden]` per image: the vision encoder plus
  projector, producing rows in the language model's embedding space.

The engine expands each placeholder to `num_tokens` copies (`expand_placeholders`), runs the
encoder when a prefill step first reaches an image, and puts its rows into the input embeddings
at the placeholder positions (`models.base.InputEmbeds`). Families whose language model attends
to images through cross-attention instead of placeholder rows would add their own hook beside
`embed_images`; nothing here assumes every image becomes prompt rows beyond these two methods.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from anyquant.errors import AnyquantError

if TYPE_CHECKING:
    from pathlib import Path

    from torch import Tensor


# Default budget of the engine's encoder-output cache (see engine/multimodal.py's EncoderCache).
ENCODER_CACHE_BYTES = 256 << 20


class ImageInputError(AnyquantError):
    """An image, or the prompt's image placeholders, cannot be used (a client error)."""


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image."""

    tensors: dict[str, Tensor]  # what the family's encoder reads (e.g. pixel_values, grid_thw)
    num_tokens: int  # embeddings the encoder yields = placeholder tokens it takes in the prompt
    digest: bytes  # hash of the pixels and the preprocessing settings (encoder and prefix caches)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def image_digest(image: Any, settings: str) -> bytes:
    """128-bit hash of a PIL image's mode, size and pixels plus the processor's `settings`."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}:{settings}".encode())
    h.update(image.tobytes())
    return h.digest()


class ImageProcessor(ABC):
    """Per-checkpoint image preprocessing and prompt layout (see the module docstring)."""

    image_token_id: int  # the placeholder token of an image in the prompt

    @abstractmethod
    def process(self, image: Any) -> ImageInput:
        """A PIL image -> the encoder's input; raises ImageInputError for an unusable image."""

    @abstractmethod
    def num_tokens_for(self, width: int, height: int) -> int:
        """Placeholder tokens (= encoder rows) an image of this size takes, without processing it."""

    @property
    @abstractmethod
    def max_tokens_per_image(self) -> int:
        """The most placeholder tokens one image can take (the prompt-length budget per image)."""

    def expand_placeholders(
        self, token_ids: list[int], images: list[ImageInput]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Each run of placeholder tokens is one image, in order: a single placeholder (as chat
        templates write it) becomes `num_tokens` copies, a run of exactly `num_tokens` stays.
        Returns the new ids and each image's (first token index, length)."""
        runs: list[tuple[int, int]] = []
        i = 0
        while i < len(token_ids):
            if token_ids[i] == self.image_token_id:
                j = i
                while j < len(token_ids) and token_ids[j] == self.image_token_id:
                    j += 1
                runs.append((i, j - i))
                i = j
            else:
                i += 1
        if len(runs) != len(images):
            raise ImageInputError(
                f"the prompt has {len(runs)} image placeholder(s) (token {self.image_token_id}) but "
                f"{len(images)} image(s) were given; put one placeholder per image"
            )
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        at = 0
        for (start, length), image in zip(runs, images):
            if length not in (1, image.num_tokens):
                raise ImageInputError(
                    f"an image placeholder run of {length} tokens at token {start}: expected 1 "
                    f"(expanded here) or the image's {image.num_tokens}"
                )
            out.extend(token_ids[at:start])
            spans.append((len(out), image.num_tokens))
            out.extend([self.image_token_id] * image.num_tokens)
            at = start + length
        out.extend(token_ids[at:])
        return out, spans

    def prompt_positions(
        self, token_ids: list[int], images: list[ImageInput], spans: list[tuple[int, int]]
    ) -> tuple[Tensor | None, int]:
        """Positions of the prompt's tokens when they are not 0..P-1: ([rows, P], delta) where the
        tokens after the prompt (generated ones) sit at index + delta on every row. None: plain."""
        return None, 0


@runtime_checkable
class ImageEncoder(Protocol):
    """What the engine calls on a model that takes images (rank 0's tensor-parallel proxy too)."""

    def embed_images(self, images: list[ImageInput]) -> list[Tensor]: ...


@runtime_checkable
class MultimodalModel(ImageEncoder, Protocol):
    """A model family that takes images: its encoder, and the processor the front ends use."""

    def image_processor(self, model_dir: Path) -> ImageProcessor: ...
