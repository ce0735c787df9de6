"""Every GGML block type translates exactly: our canonical weight, dequantized by the reference,
equals `gguf.quants.dequantize` (llama.cpp's own Python reader) bit for bit on random blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES, decode_rows  # noqa: E402
from anyquant.quant.reference import dequantize  # noqa: E402
from anyquant.quant.weight import QuantWeight  # noqa: E402
from tests.gguf.fixtures import dequantize as gguf_dequantize  # noqa: E402
from tests.gguf.fixtures import random_blocks  # noqa: E402


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_dequantized_bits_equal_gguf_py(name: str) -> None:
    kind = BLOCK_TYPES[name]
    rows, per_row = 5, 3
    raw = random_blocks(name, rows, per_row * kind.block, np.random.default_rng(0))
    want = gguf_dequantize(raw, name)  # gguf-py's reader (Q8_K: a reference from the block layout)
    codes, scale, offset = decode_rows(kind, torch.from_numpy(raw))
    weight = QuantWeight(kind.spec, (rows, per_row * kind.block), codes, scale, offset=offset)
    got = dequantize(weight.validate(name), torch.float32).numpy()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.int32), want.astype(np.float32).view(np.int32))
