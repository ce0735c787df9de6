"""InternVL's image preprocessing: dynamic tiling into square tiles plus a thumbnail, then pixels.

Follows the rules of InternVL's published `dynamic_preprocess` / `find_closest_aspect_ratio`:
among the grids of `cols x rows` tiles with `min_tiles <= cols * rows <= max_tiles`, take the one
whose aspect ratio is closest to the image's (on a tie, a larger grid wins when the image has more
than half that grid's pixels); resize the image to the grid (bicubic), cut it into tiles row by
row, and append the whole image resized to one tile as a thumbnail when there is more than one
tile. Pixels are scaled to [0, 1] and normalised with the ImageNet mean and deviation, as its
`build_transform` does. Pillow is imported only here (the `vision` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anyquant.errors import AnyquantError

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols * rows <= max_tiles, fewest tiles first.

    Built as a set and then sorted stably by tile count, like the published code: the order among
    grids with as many tiles decides ties, so it must match (Python's set order of int tuples is
    fixed by their hashes)."""
    if not 1 <= min_tiles <= max_tiles:
        raise AnyquantError(
            f"image tiling needs 1 <= min_dynamic_patch <= max_dynamic_patch, got {min_tiles}, {max_tiles}"
        )
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """The grid whose cols / rows is closest to width / height; later (larger) grids win ties when
    the image has more than half of their pixels."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12, thumbnail: bool = True
) -> list[Image]:
    """RGB tiles of `tile` x `tile` pixels, row by row, then the thumbnail (when > 1 tile)."""
    from PIL import Image as PILImage

    image = image.convert("RGB") if image.mode != "RGB" else image
    width, height = image.size
    if width < 1 or height < 1:
        raise AnyquantError(f"image of {width}x{height} pixels has nothing to encode")
    cols, rows = closest_grid(width, height, candidate_grids(min_tiles, max_tiles), tile)
    resized = image.resize((cols * tile, rows * tile), PILImage.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile), PILImage.Resampling.BICUBIC))
    return tiles


def normalize(tile: Image, size: int) -> Tensor:
    """One RGB tile -> [3, size, size] float32, (x / 255 - mean) / std."""
    from PIL import Image as PILImage

    if tile.size != (size, size):
        tile = tile.resize((size, size), PILImage.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(tile.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = data.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def pixel_values(
    image: Image, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12, thumbnail: bool = True
) -> Tensor:
    """An image -> [tiles, 3, tile, tile] float32 pixel values for the vision encoder."""
    tiles = dynamic_tiles(image, tile, min_tiles, max_tiles, thumbnail)
    return torch.stack([normalize(t, tile) for t in tiles])
