"""InternVL's `ImageProcessor` for the engine's multimodal plumbing (anyquant.models.multimodal).

Owns turning a PIL image into its tiles (anyquant.models.internvl_image) and the prompt layout:
each image is one run of `<IMG_CONTEXT>` tokens (a single one, as a prompt or chat template writes
it, is expanded to tiles * tokens_per_tile) between `<img>` and `</img>`, which are added where the
prompt does not have them. Token ids come from the checkpoint's tokenizer, where InternVL's
releases register these three as added tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anyquant.errors import CheckpointError
from anyquant.models.internvl_image import candidate_grids, closest_grid, pixel_values
from anyquant.models.multimodal import ImageInput, ImageInputError, ImageProcessor, image_digest


def added_token_ids(model_dir: Path, names: tuple[str, ...]) -> dict[str, int]:
    """The ids of added tokens by their text, from tokenizer.json (tokenizer_config.json's
    `added_tokens_decoder` as a fallback)."""
    found: dict[str, int] = {}
    for file, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        path = model_dir / file
        if not path.is_file():
            continue
        entries = json.loads(path.read_text()).get(key) or []
        if isinstance(entries, dict):  # tokenizer_config.json: {"id": {"content": ...}}
            entries = [{"id": int(i), **e} for i, e in entries.items() if isinstance(e, dict)]
        for entry in entries:
            if isinstance(entry, dict) and entry.get("content") in names:
                found.setdefault(entry["content"], int(entry["id"]))
    missing = [n for n in names if n not in found]
    if missing:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has no added token {', '.join(map(repr, missing))} "
            "(InternVL tokenizers register <img>, </img> and <IMG_CONTEXT>)"
        )
    return found


class InternVLImageProcessor(ImageProcessor):
    def __init__(self, model: Any, model_dir: Path) -> None:
        ids = added_token_ids(Path(model_dir), (model.image_token, "<img>", "</img>"))
        self.image_token_id = ids[model.image_token]
        self.start_id, self.end_id = ids["<img>"], ids["</img>"]
        self.tile = int(model.tile_size)
        self.tokens_per_tile = int(model.tokens_per_tile)
        if model.dynamic_tiles:
            self.tiling = (int(model.min_tiles), int(model.max_tiles), bool(model.use_thumbnail))
        else:
            self.tiling = (1, 1, False)
        self.settings = f"internvl:{self.tile}:{self.tiling}"

    def process(self, image: Any) -> ImageInput:
        try:
            pixels = pixel_values(image, self.tile, *self.tiling)
        except (OSError, ValueError) as error:
            raise ImageInputError(f"cannot use the image: {error}") from error
        return ImageInput(
            {"pixel_values": pixels},
            pixels.shape[0] * self.tokens_per_tile,
            image_digest(image, self.settings),
        )

    def num_tokens_for(self, width: int, height: int) -> int:
        min_tiles, max_tiles, thumbnail = self.tiling
        cols, rows = closest_grid(width, height, candidate_grids(min_tiles, max_tiles), self.tile)
        tiles = cols * rows + (1 if thumbnail and cols * rows > 1 else 0)
        return tiles * self.tokens_per_tile

    @property
    def max_tokens_per_image(self) -> int:
        _, max_tiles, thumbnail = self.tiling
        return (max_tiles + (1 if thumbnail and max_tiles > 1 else 0)) * self.tokens_per_tile

    def expand_placeholders(
        self, token_ids: list[int], images: list[ImageInput]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """As the base class, then `<img>` / `</img>` around every image where they are missing."""
        ids, spans = super().expand_placeholders(token_ids, images)
        out: list[int] = []
        placed: list[tuple[int, int]] = []
        at = 0
        for start, length in spans:
            out.extend(ids[at:start])
            if not (start > 0 and ids[start - 1] == self.start_id):
                out.append(self.start_id)
            placed.append((len(out), length))
            out.extend(ids[start : start + length])
            at = start + length
            if not (at < len(ids) and ids[at] == self.end_id):
                out.append(self.end_id)
        out.extend(ids[at:])
        return out, placed
