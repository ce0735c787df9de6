"""InternVL's dynamic tiling rules (as its published `dynamic_preprocess` states them), the pixel
normalisation, and the `<image>` -> `<img>` + N x `<IMG_CONTEXT>` + `</img>` prompt expansion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anyquant.errors import AnyquantError
from anyquant.models.internvl import InternVLChatModel, pixel_shuffle
from anyquant.models.internvl_image import candidate_grids, closest_grid, dynamic_tiles, pixel_values

Image = pytest.importorskip("PIL.Image")


def _image(width: int, height: int, seed: int = 0) -> object:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_grids_are_all_tile_counts_in_range_fewest_first() -> None:
    grids = candidate_grids(1, 6)
    assert set(grids) == {(c, r) for c in range(1, 7) for r in range(1, 7) if c * r <= 6}
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


@pytest.mark.parametrize(
    ("size", "tile", "max_tiles", "grid"),
    [
        ((800, 400), 448, 12, (2, 1)),  # exact 2:1
        ((400, 1300), 448, 12, (1, 3)),  # 0.31 is closest to 1:3
        ((448, 448), 448, 12, (1, 1)),  # equal ratios (1:1, 2:2, 3:3): a small image keeps one tile
        ((2000, 2000), 448, 12, (3, 3)),  # ...a large one takes the largest equal-ratio grid it fills
        ((150, 100), 56, 2, (2, 1)),  # 1.5 is as far from 1:1 as from 2:1: enough pixels for 2 tiles
        ((15, 10), 56, 2, (1, 1)),  # same tie, too few pixels
    ],
)
def test_closest_grid(size: tuple[int, int], tile: int, max_tiles: int, grid: tuple[int, int]) -> None:
    assert closest_grid(*size, candidate_grids(1, max_tiles), tile) == grid


def test_tiles_are_row_major_crops_then_a_thumbnail() -> None:
    image = _image(112, 112)  # already 2x2 tiles of 56: no resampling of the crops
    tiles = dynamic_tiles(image, tile=56, max_tiles=4)
    raw = np.asarray(image)
    assert len(tiles) == 5
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.array_equal(np.asarray(tiles[i]), raw[r * 56 : (r + 1) * 56, c * 56 : (c + 1) * 56])
    assert tiles[-1].size == (56, 56)
    assert len(dynamic_tiles(_image(56, 56), tile=56)) == 1  # one tile: no thumbnail


def test_pixel_values_are_imagenet_normalised() -> None:
    image = _image(56, 56, seed=2)
    got = pixel_values(image, tile=56)
    raw = np.asarray(image).astype(np.float64) / 255.0
    want = (raw - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert got.shape == (1, 3, 56, 56)
    assert torch.allclose(got[0], torch.from_numpy(want).permute(2, 0, 1).float(), atol=1e-6)


def test_pixel_shuffle_v2_merges_2x2_neighbours() -> None:
    x = torch.arange(4 * 4 * 1, dtype=torch.float32).reshape(1, 4, 4, 1)  # value = 4 * row + col
    y = pixel_shuffle(x, 0.5, "v2")
    assert y.shape == (1, 2, 2, 4)
    # Output (i, j) gathers input rows 2i..2i+1 and columns 2j..2j+1.
    assert sorted(y[0, 0, 1].tolist()) == [2.0, 3.0, 6.0, 7.0]
    assert sorted(y[0, 1, 0].tolist()) == [8.0, 9.0, 12.0, 13.0]


class _Prompt:
    tokens_per_tile = 3
    expand_image_prompt = InternVLChatModel.expand_image_prompt


def test_prompt_expansion() -> None:
    p = _Prompt()
    ctx = "<IMG_CONTEXT>"
    assert (
        p.expand_image_prompt("a <image> b <image>", [1, 2])
        == f"a <img>{ctx * 3}</img> b <img>{ctx * 6}</img>"
    )
    assert p.expand_image_prompt("hi", [1]) == f"<img>{ctx * 3}</img>\nhi"
    with pytest.raises(AnyquantError, match="2 <image> markers for 1 images"):
        p.expand_image_prompt("<image><image>", [1])
