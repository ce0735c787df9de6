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

# Byte offsets of each block's fp16 super-scales (ggml-common.h): random bytes there could be NaN
# or Inf, which no real file holds; every other byte is free.
FP16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}


def random_blocks(name: str, rows: int, per_row: int, seed: int = 0) -> np.ndarray:
    kind = BLOCK_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * per_row, kind.nbytes), dtype=np.uint8)
    for at in FP16_FIELDS.get(name, ()):
        values = rng.standard_normal(rows * per_row).astype(np.float16) * np.float16(0.01)
        raw[:, at : at + 2] = values.view(np.uint8).reshape(-1, 2)
    if name == "Q8_K":  # fp32 super-scale
        raw[:, 0:4] = (
            (rng.standard_normal(rows * per_row).astype(np.float32) * 0.01).view(np.uint8).reshape(-1, 4)
        )
    return raw.reshape(rows, per_row * kind.nbytes)


def q8_k_reference(raw: np.ndarray, rows: int) -> np.ndarray:
    """gguf-py has no Q8_K dequantizer: block_q8_K is {float d; int8 qs[256]; int16 bsums[16]}."""
    blocks = raw.reshape(-1, 292)
    d = blocks[:, 0:4].copy().view(np.float32)
    q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, -1)


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_dequantized_bits_equal_gguf_py(name: str) -> None:
    kind = BLOCK_TYPES[name]
    rows, per_row = 5, 3
    raw = random_blocks(name, rows, per_row)
    if name == "Q8_K":
        want = q8_k_reference(raw, rows)
    else:
        want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    codes, scale, offset = decode_rows(kind, torch.from_numpy(raw))
    weight = QuantWeight(kind.spec, (rows, per_row * kind.block), codes, scale, offset=offset)
    got = dequantize(weight.validate(name), torch.float32).numpy()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.int32), want.astype(np.float32).view(np.int32))
