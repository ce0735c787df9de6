"""The int8 KV cache's rows (layers/kv_quant.py) and paged attention over them.

Rows are checked against the documented rule computed in float64 (scale = amax / 127 as a
float32, code = round-half-to-even of x / scale, the scale's bytes after the codes), and against
hand-worked ties, zero rows and non-finite rows. Paged attention on an int8 cache is checked
against float64 attention over the rows the cache's bytes decode to (decoded here with numpy, not
with the module under test): decode rows, prefill chunks after a cached prefix, pages scattered
over the cache, GQA, sliding windows.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.layers import attention
from anyquant.layers.kv_quant import (
    SCALE_BYTES,
    cache_dtype,
    dequantize_rows,
    quantize_rows,
    row_width,
    stored_width,
)
from tests.helpers.attention_reference import causal_attention_float64


def _rule(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule in float64: (codes [.., W] as float64, float32 scales [..]).

    float32 division is correctly rounded, and so is float64 division followed by rounding to
    float32 (53 >= 2 * 24 + 2 bits), so x / scale rounded to float32 is what the row's quotient is."""
    xd = x.double()
    amax = xd.abs().amax(dim=-1)
    scale = (amax / 127).float()  # float32, as stored
    quotient = (xd / scale.double()[..., None]).float().double()
    codes = torch.round(quotient).clamp(-127, 127)  # torch.round: half to even
    codes = torch.where(scale[..., None] == 0, torch.zeros_like(codes), codes)
    return codes, scale


def _decode_bytes(rows: torch.Tensor) -> np.ndarray:
    """int8 rows [..., W + 4] -> float64 [..., W]: codes times the float32 read from the last 4
    bytes (numpy's own reinterpretation of the bytes)."""
    raw = rows.numpy()
    width = raw.shape[-1] - SCALE_BYTES
    scale = np.ascontiguousarray(raw[..., width:]).view(np.float32).astype(np.float64)  # [..., 1]
    return raw[..., :width].astype(np.float64) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_follow_the_documented_rule(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 24, generator=g) * torch.logspace(-3, 2, 5)[:, None, None]).to(dtype)
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 24 + SCALE_BYTES)
    codes, scale = _rule(x)
    assert torch.equal(rows[..., :24].double(), codes)
    want_bytes = [list(struct.pack("=f", float(s))) for s in scale.reshape(-1).tolist()]
    got_bytes = (rows[..., 24:].reshape(-1, 4).numpy().view(np.uint8)).tolist()
    assert got_bytes == want_bytes
    # each row's largest value maps to +-127, and the dequantized rows are within scale / 2
    assert torch.equal(codes.abs().amax(-1), torch.full((5, 3), 127.0, dtype=torch.float64))
    back = dequantize_rows(rows, torch.float32)
    assert torch.equal(back.double(), torch.from_numpy(_decode_bytes(rows)).float().double())
    err = (back.double() - x.double()).abs().amax(-1)
    assert bool((err <= scale.double() / 2 * (1 + 1e-4)).all())
    assert dequantize_rows(rows, dtype).dtype == dtype


def test_ties_round_to_even_and_zero_rows_store_zero() -> None:
    # amax 127: scale exactly 1.0, so x / scale is x and each .5 is a tie.
    x = torch.tensor([[127.0, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, -126.5]])
    rows = quantize_rows(x)
    assert rows[0, :8].tolist() == [127, 2, -2, 4, 0, 0, 2, -126]
    assert struct.unpack("=f", bytes(rows[0, 8:].numpy().view(np.uint8)))[0] == 1.0
    zero = quantize_rows(torch.zeros(2, 6, dtype=torch.bfloat16))
    assert torch.equal(zero, torch.zeros(2, 10, dtype=torch.int8))  # codes 0, scale 0.0 (bytes 0)
    assert torch.equal(dequantize_rows(zero, torch.bfloat16), torch.zeros(2, 6, dtype=torch.bfloat16))


def test_non_finite_rows_read_back_as_nan_and_leave_the_others_alone() -> None:
    x = torch.randn(4, 8)
    x[1, 3] = float("inf")
    x[2, 0] = float("-inf")
    x[3, 5] = float("nan")
    rows = quantize_rows(x)
    assert torch.equal(rows[1:, :8], torch.zeros(3, 8, dtype=torch.int8))
    back = dequantize_rows(rows, torch.float32)
    assert bool(back[1:].isnan().all())
    codes, scale = _rule(x[:1])
    assert torch.equal(rows[:1, :8].double(), codes)
    assert torch.equal(back[:1], (codes * scale.double()[..., None]).float())


def test_widths_and_option_names() -> None:
    assert stored_width(64, torch.int8) == 68 and stored_width(64, torch.bfloat16) == 64
    assert row_width(torch.zeros(2, 3, 68, dtype=torch.int8)) == 64
    assert row_width(torch.zeros(2, 3, 68, dtype=torch.bfloat16)) == 68
    assert cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert cache_dtype("int8", torch.bfloat16) == torch.int8
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' is not supported; choose one of auto, int8"):
        cache_dtype("fp8", torch.float32)


# -- paged attention on an int8 cache --------------------------------------------------------------


def _int8_cache(hkv: int = 2, d: int = 8, dv: int = 8, pages: int = 32, page: int = 4) -> PagedKVCache:
    """A one-layer int8 cache whose every slot holds a random row (older tokens of the sequences)."""
    torch.manual_seed(0)
    cache = PagedKVCache(1, pages, page, hkv, d, dv, torch.int8, compute_dtype=torch.float32)
    assert cache.k.shape == (1, hkv, pages * page, d + SCALE_BYTES)
    assert cache.v.shape == (1, hkv, pages * page, dv + SCALE_BYTES)
    cache.k.copy_(quantize_rows(torch.randn(1, hkv, pages * page, d) * 2))
    cache.v.copy_(quantize_rows(torch.randn(1, hkv, pages * page, dv)))
    return cache


def _check_int8(
    cache: PagedKVCache,
    sequences: list[tuple[list[int], int, int]],
    window: int | None,
    heads: int = 6,
    dtype: torch.dtype = torch.float32,
    atol: float = 1e-5,
) -> None:
    """Attend one step of `sequences` and compare every token's output with float64 attention over
    the rows the cache holds afterwards; the step's own rows must be its keys / values quantized."""
    page, hkv, d, dv = cache.page_size, cache.k.shape[1], cache.k_dim, cache.v_dim
    ctx = PagedAttention.for_sequences(cache, sequences)
    t = sum(n for _, _, n in sequences)
    q = torch.randn(t, heads, d).to(dtype)
    k, v = torch.randn(t, hkv, d).to(dtype), torch.randn(t, hkv, dv).to(dtype)
    out = ctx.attend(0, q, k, v, d**-0.5, window)
    assert out.dtype == dtype and out.shape == (t, heads * dv)
    at = 0
    for pages, cached, new in sequences:
        slots = torch.tensor([pages[p // page] * page + p % page for p in range(cached + new)])
        keys = _decode_bytes(cache.k[0][:, slots].transpose(0, 1).contiguous())  # [S, Hkv, D] float64
        values = _decode_bytes(cache.v[0][:, slots].transpose(0, 1).contiguous())
        # this step's rows were stored quantized: within half a step of the row's scale
        stored_err = np.abs(keys[cached:] - k[at : at + new].double().numpy()).max(-1)
        assert (stored_err <= np.abs(k[at : at + new].double().numpy()).max(-1) / 254 * (1 + 1e-4)).all()
        want = causal_attention_float64(
            q[at : at + new], torch.from_numpy(keys), torch.from_numpy(values), cached + new, window
        )
        assert torch.allclose(out[at : at + new].double(), want, atol=atol), (pages, window)
        at += new


@pytest.mark.parametrize("matmul_min_keys", [0, 1 << 30])  # decode through matmuls / through SDPA
@pytest.mark.parametrize("window", [None, 5, 23])
def test_mixed_step_on_an_int8_cache_matches_float64_attention(
    window: int | None, matmul_min_keys: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "MATMUL_DECODE_MIN_KEYS", matmul_min_keys)
    shared = [9, 3]
    # (pages, tokens already cached, new tokens): two decodes, a chunk after a cached prefix, a
    # fresh prompt; pages scattered and shared; 6 query heads on 2 KV heads (GQA)
    sequences = [
        ([5, 17, 2, 30, 11], 18, 1),
        ([*shared, 21, 7], 13, 1),
        ([*shared, 12, 25, 26], 8, 9),
        ([14, 0, 28], 0, 10),
    ]
    _check_int8(_int8_cache(), sequences, window)


@pytest.mark.parametrize(
    "sequences",
    [
        [([3, 4, 5, 6], 13, 1)],  # one decode over consecutive pages: read in place
        [([3, 4, 5, 6], 6, 7)],  # one chunk after a cached prefix: the causal split without a mask
        [([8, 9, 10], 0, 11)],  # one fresh prompt: SDPA's causal kernel
        [([20, 1, 15], 5, 6)],  # one chunk over scattered pages
    ],
)
@pytest.mark.parametrize("window", [None, 3])
def test_single_sequence_paths_on_an_int8_cache(
    sequences: list[tuple[list[int], int, int]], window: int | None
) -> None:
    _check_int8(_int8_cache(), sequences, window)


def test_bf16_queries_and_wider_values_on_an_int8_cache() -> None:
    """bf16 compute (rows dequantized to bf16), MHA, and a value width other than the key's."""
    sequences = [([5, 17, 2], 9, 1), ([7, 8], 3, 4)]
    _check_int8(_int8_cache(hkv=3, d=16, dv=32), sequences, None, heads=3, dtype=torch.bfloat16, atol=3e-2)


def test_int8_cache_counts_its_bytes() -> None:
    # 2 layers x 16 slots x 2 KV heads x (key 128 + 4, value 128 + 4) bytes vs 256 + 256 in bf16
    assert PagedKVCache.bytes_per_page(2, 16, 2, 128, 128, torch.int8) == 2 * 16 * 2 * 264
    assert PagedKVCache.bytes_per_page(2, 16, 2, 128, 128, torch.bfloat16) == 2 * 16 * 2 * 512
    cache = PagedKVCache(2, 3, 16, 2, 128, 128, torch.int8, compute_dtype=torch.bfloat16)
    held = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert held == 3 * PagedKVCache.bytes_per_page(2, 16, 2, 128, 128, torch.int8)


def test_int8_cache_refuses_a_value_inside_the_key() -> None:
    from anyquant.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="int8 KV cache cannot hold a value inside the key"):
        PagedKVCache(1, 4, 4, 1, 24, 16, torch.int8, value_in_key=True)
