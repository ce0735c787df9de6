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
at the placeholder positions (`models.base.InputEmbeds`).

Families whose language model attends to images through cross-attention (Llama-3.2-Vision) keep
one placeholder token per image and put no rows into the prompt: their processor's
`cross_images` says which prompt tokens attend which image (`CrossImage`), `embed_images` yields
the rows the cross-attention layers read (`ImageInput.encoder_rows` of them), and the engine hands
them to the model once per request with each step's `CrossAttentionStep`.
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
    # Rows `embed_images` yields when they are not placeholder rows (cross-attention families).
    encoder_rows: int = 0

    @property
    def num_rows(self) -> int:
        """Rows of the encoder's output for this image."""
        return self.encoder_rows or self.num_tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def require_image(image: Any) -> tuple[int, int]:
    """`image`'s (width, height) once it is a non-empty PIL image; else an ImageInputError."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ImageInputError(f"an image must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageInputError(f"image of {width}x{height} pixels: empty")
    return width, height


def to_rgb(image: Any) -> Any:
    """RGB as the reference processors convert: transparent pixels over white, other modes by PIL."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_digest(image: Any, settings: str) -> bytes:
    """128-bit hash of a PIL image's mode, size and pixels plus the processor's `settings`."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}:{settings}".encode())
    h.update(image.tobytes())
    return h.digest()


@dataclass(frozen=True)
class CrossImage:
    """How the tokens of a request attend one image through cross-attention."""

    first_token: int  # the first token (index in the prompt) that attends the image
    end_token: int  # one past the last; -1: every later token, generated ones included
    num_keys: int  # the image's encoder rows (keys of the cross-attention)
    valid_keys: int  # the first `valid_keys` may be attended (the rest pad the image's tiles)


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

    def cross_images(self, token_ids: list[int], images: list[ImageInput]) -> list[CrossImage] | None:
        """Cross-attention families: which tokens of the (expanded) prompt attend which image.
        None (the default): the images are placeholder rows of the prompt."""
        return None

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


@dataclass(frozen=True, eq=False)
class CrossSequence:
    """One sequence of a step whose tokens cross-attend images (a cross-attention family)."""

    key: int  # the request's cross-attention state in the model; -1: this step only, not kept
    first_row: int  # its rows of the step are first_row .. first_row + num_rows - 1
    num_rows: int
    first_position: int  # the token index (in its request) of its first row
    # Given when the model must build the request's state this step (its first step, or a
    # one-off forward): the images' ranges and their encoder rows [sum of num_keys, hidden].
    images: tuple[CrossImage, ...] = ()
    states: Tensor | None = None


@dataclass(frozen=True, eq=False)
class CrossAttentionStep:
    """The cross-attention inputs of one forward step: the sequences that attend images (every
    other row of the step skips the cross-attention layers) and the states to free."""

    sequences: tuple[CrossSequence, ...]
    release: tuple[int, ...] = ()  # keys of finished requests

    def to_message(self) -> Tensor:
        """int64 [n, r, release[r], then per sequence: key, first_row, num_rows, first_position,
        images, S, H, 4 ints per image, S * H state values as their fp32 bit patterns] (exact)."""
        import torch

        parts = [torch.tensor([len(self.sequences), len(self.release), *self.release], dtype=torch.long)]
        for s in self.sequences:
            rows, width = (0, 0) if s.states is None else tuple(s.states.shape)
            head = [s.key, s.first_row, s.num_rows, s.first_position, len(s.images), rows, width]
            for im in s.images:
                head += [im.first_token, im.end_token, im.num_keys, im.valid_keys]
            parts.append(torch.tensor(head, dtype=torch.long))
            if s.states is not None:
                bits = s.states.detach().cpu().float().contiguous().view(torch.int32).long()
                parts.append(bits.reshape(-1))
        return torch.cat(parts)

    @staticmethod
    def from_message(msg: Tensor, device: Any) -> CrossAttentionStep:
        import torch

        n, r = int(msg[0]), int(msg[1])
        release = tuple(int(v) for v in msg[2 : 2 + r])
        at = 2 + r
        sequences = []
        for _ in range(n):
            key, first_row, num_rows, first_pos, k, rows, width = (int(v) for v in msg[at : at + 7])
            at += 7
            images = tuple(CrossImage(*(int(v) for v in msg[at + 4 * i : at + 4 * i + 4])) for i in range(k))
            at += 4 * k
            states = None
            if rows:
                states = msg[at : at + rows * width].to(torch.int32).view(torch.float32).view(rows, width)
                states = states.to(device)
                at += rows * width
            sequences.append(CrossSequence(key, first_row, num_rows, first_pos, images, states))
        return CrossAttentionStep(tuple(sequences), release)
