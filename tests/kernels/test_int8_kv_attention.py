"""The C++ paged decode attention and decode step on int8 KV caches (layers/kv_quant.py's rows:
`width` int8 codes, then the row's float32 scale).

The kernel is checked against float64 attention over the rows dequantized here, code * scale from
the cache's own bytes (not by the code under test), on caches built from random codes and random
per-row scales (so every key's and value's scale matters); the decode step's store against
`kv_quant.quantize_rows`, byte for byte. Also: the errors, the fake (shape-only) implementations,
and the choice between the kernel and the pure-torch path for int8 caches, both ways.
"""

from __future__ import annotations

import pytest
import torch

from anyquant.layers import custom_ops, decode_kernel, kv_quant
from anyquant.quant.kernels import cpu_ext
from tests.helpers.threads import torch_threads
from tests.kernels.test_paged_decode_kernel import _reference

PAGE = 16
SCALE_BYTES = 4  # the format's float32 scale after each row's codes

# fp32 queries: fp32 arithmetic on exact codes; bf16 queries: the output rounded to bf16 (2^-9
# relative, outputs up to ~2.5 here).
TOL = {torch.float32: 5e-5, torch.bfloat16: 1.5e-2}


def _ops():
    reason = decode_kernel._cpu_reason(True)
    if reason is not None:
        pytest.skip(reason)
    custom_ops.register_extension_fakes()
    return cpu_ext.ops()


def _int8_rows(shape: tuple[int, ...], g: torch.Generator, zero_every: int = 0) -> torch.Tensor:
    """int8 rows [..., width + 4] of random codes in [-127, 127] and a random scale per row over an
    order of magnitude (values up to ~2.5); every `zero_every`-th row all zero (scale 0, codes 0)."""
    *lead, width = shape
    codes = torch.randint(-127, 128, (*lead, width), generator=g, dtype=torch.int8)
    scales = 10 ** (torch.rand(*lead, 1, generator=g) - 2.7)  # 0.002 .. 0.02
    if zero_every:
        zero = (torch.arange(codes[..., 0].numel()) % zero_every == 0).view(*lead, 1)
        codes = codes.masked_fill(zero, 0)
        scales = scales.masked_fill(zero, 0.0)
    return torch.cat([codes, scales.float().view(torch.int8)], dim=-1)


def _dequantized(rows: torch.Tensor) -> torch.Tensor:
    """float64 [..., width]: each row's codes times the float32 its last 4 bytes hold."""
    width = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., width:].contiguous().view(torch.float32).double()
    return rows[..., :width].double() * scale


def _case(hkv, group, dk, dv, lens, q_dtype, seed=0, page=PAGE):
    """q [B, H, dk]; int8 caches [hkv, slots, dk + 4] / [hkv, slots, dv + 4]; each sequence's pages
    scattered over the cache; context lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // page) for n in lens) + 1
    num_pages = len(lens) * width + 3
    kc = _int8_rows((hkv, num_pages * page, dk), g, zero_every=29)
    vc = _int8_rows((hkv, num_pages * page, dv), g, zero_every=31)
    order = torch.randperm(num_pages, generator=g)
    tables = order[: len(lens) * width].view(len(lens), width).contiguous()
    q = (torch.randn(len(lens), hkv * group, dk, generator=g) * 2).to(q_dtype)
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.long)


def _want(q, kc, vc, tables, lens, scale, window, page=PAGE):
    return _reference(q, _dequantized(kc), _dequantized(vc), tables, lens, scale, window, page)


def _err(out: torch.Tensor, want: torch.Tensor) -> float:
    return (out.double() - want).abs().max().item()


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("hkv", "group", "dk", "dv"),
    [(2, 7, 64, 64), (4, 1, 128, 128), (2, 2, 128, 64), (2, 2, 64, 128), (1, 8, 576, 512)],
    ids=["gqa7-d64", "mha-d128", "gqa2-k128-v64", "gqa2-k64-v128", "latent-576-512"],
)
@pytest.mark.parametrize("window", [None, 37])
def test_matches_float64_over_the_dequantized_rows(q_dtype, hkv, group, dk, dv, window):
    ops = _ops()
    lens = [1, 15, 16, 17, 300, 33, 0]  # page boundaries either side, an empty context
    q, kc, vc, tables, lens_t = _case(hkv, group, dk, dv, lens, q_dtype)
    scale = dk**-0.5
    want = _want(q, kc, vc, tables, lens_t, scale, window)
    for splits in (0, 1, 3):  # 3: partial chunks merged by their log-sum-exp weights
        out = ops.paged_decode_attention(q, kc, vc, tables, lens_t, PAGE, scale, window or 0, splits)
        assert out.dtype == q_dtype and out.shape == (len(lens), hkv * group, dv)
        assert _err(out, want) < TOL[q_dtype], splits
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # no keys: zeros


def test_bf16_queries_give_the_fp32_queries_result_rounded():
    """A bf16 query is widened exactly before the same fp32 arithmetic: its output is the fp32
    query's output rounded to bf16, bit for bit."""
    ops = _ops()
    q, kc, vc, tables, lens = _case(2, 7, 64, 64, [40, 200, 3], torch.bfloat16, seed=3)
    out = ops.paged_decode_attention(q, kc, vc, tables, lens, PAGE, 0.125)
    assert torch.equal(
        out, ops.paged_decode_attention(q.float(), kc, vc, tables, lens, PAGE, 0.125).bfloat16()
    )


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("group", "dk", "dv"), [(7, 64, 64), (2, 128, 64), (1, 64, 128)])
@pytest.mark.parametrize("window", [None, 301])
def test_long_context_among_short_ones_split_over_threads(q_dtype, group, dk, dv, window):
    """One long context among short and empty ones: with 2 or 3 threads the kernel cuts the long
    one into chunks the threads share and merges them; forced splits too. Every thread count gives
    float64's attention over the dequantized rows."""
    ops = _ops()
    lens = [1, 2047, 0, 129, 17, 600]
    q, kc, vc, tables, lens_t = _case(2, group, dk, dv, lens, q_dtype, seed=6)
    scale = dk**-0.5
    want = _want(q, kc, vc, tables, lens_t, scale, window)
    for n in (1, 2, 3):
        with torch_threads(n):
            for splits in (0, 16):
                out = ops.paged_decode_attention(q, kc, vc, tables, lens_t, PAGE, scale, window or 0, splits)
                assert torch.equal(out[2], torch.zeros_like(out[2]))  # no keys
                assert _err(out, want) < TOL[q_dtype], (n, splits)


@pytest.mark.parametrize("page", [1, 5, 32])
def test_page_sizes_that_cut_blocks_of_keys(page):
    """Pages of 1 key, of an odd 5 (blocks of 8 keys straddle pages mid-block), larger than a
    block; lengths around the blocks, on 1 and 2 threads."""
    ops = _ops()
    lens = [1, 7, 8, 9, 31, 33, 517, 0, 250]
    q, kc, vc, tables, lens_t = _case(2, 3, 64, 64, lens, torch.float32, seed=7, page=page)
    for window in (None, 100):
        want = _want(q, kc, vc, tables, lens_t, 0.125, window, page)
        for n in (1, 2):
            with torch_threads(n):
                out = ops.paged_decode_attention(q, kc, vc, tables, lens_t, page, 0.125, window or 0)
                assert _err(out, want) < TOL[torch.float32], (window, n)


def test_key_scales_raise_the_running_max_block_after_block():
    """Equal codes on every key, scales growing along the context: the score grows only by the
    key's scale, every block raises the running max (the earlier blocks rescaled each time), and the
    softmax leans to the last keys, as float64 says."""
    ops = _ops()
    q, kc, vc, tables, lens = _case(2, 5, 64, 64, [333, 70], torch.float32, seed=4)
    q = torch.ones_like(q)
    kc[..., :64] = 1
    for b, n in enumerate(lens.tolist()):  # key i of sequence b: scale (1 + i) / 640, score (1 + i) / 10
        pos = torch.arange(n)
        slots = tables[b][pos // PAGE] * PAGE + pos % PAGE
        ramp = ((1 + pos) / 640.0).float().view(torch.int8).view(n, SCALE_BYTES)
        kc[:, slots, 64:] = ramp
    want = _want(q, kc, vc, tables, lens, 1.0, None)
    for splits in (1, 2):
        out = ops.paged_decode_attention(q, kc, vc, tables, lens, PAGE, 1.0, 0, splits)
        assert _err(out, want) < TOL[torch.float32], splits


@pytest.mark.parametrize("which", ["key", "value"])
def test_a_non_finite_row_makes_its_sequence_nan(which):
    """A row stored from a non-finite value has a NaN scale and zero codes (kv_quant): the sequence
    that reads it gets a non-finite output (its key's and value's rows alike), the others are
    unaffected."""
    ops = _ops()
    q, kc, vc, tables, lens = _case(2, 2, 64, 64, [50, 50], torch.float32, seed=8)
    slot = int(tables[0][20 // PAGE]) * PAGE + 20 % PAGE  # key 20 of sequence 0
    nan_row = kv_quant.quantize_rows(torch.full((64,), float("nan")))
    (kc if which == "key" else vc)[:, slot] = nan_row
    out = ops.paged_decode_attention(q, kc, vc, tables, lens, PAGE, 0.125)
    assert not torch.isfinite(out[0]).all()
    want = _want(q[1:], kc, vc, tables[1:], lens[1:], 0.125, None)
    assert _err(out[1:], want) < TOL[torch.float32]


def _step(hkv, group, dk, dv, lens, q_dtype, new_dtype, pad=1, seed=0):
    """A decode step of len(lens) sequences (context lens[b], its new token last) and `pad` padding
    rows (slot -1, context 0); the new rows k / v in `new_dtype`."""
    q, kc, vc, tables, ctx = _case(hkv, group, dk, dv, lens, q_dtype, seed=seed)
    b = len(lens)
    pos = ctx - 1
    slots = tables[torch.arange(b), pos // PAGE] * PAGE + pos % PAGE
    g = torch.Generator().manual_seed(seed + 1)
    k = torch.randn(b + pad, hkv, dk, generator=g).to(new_dtype)
    v = torch.randn(b + pad, hkv, dv, generator=g).to(new_dtype)
    q = torch.cat([q, torch.randn(pad, q.shape[1], dk, generator=g).to(q_dtype)])
    tables = torch.cat([tables, tables.new_zeros(pad, tables.shape[1])])  # padding: never read
    slots = torch.cat([slots, slots.new_full((pad,), -1)])
    ctx = torch.cat([ctx, ctx.new_zeros(pad)])
    return q, k, v, kc, vc, slots, tables, ctx


@pytest.mark.parametrize(
    ("hkv", "group", "dk", "dv", "window", "q_dtype", "new_dtype"),
    [
        (2, 7, 64, 64, None, torch.bfloat16, torch.bfloat16),  # Qwen2.5-0.5B's GQA-7, bf16 compute
        (2, 7, 64, 64, None, torch.float32, torch.float32),
        (4, 2, 128, 64, 20, torch.float32, torch.bfloat16),  # key width != value width, a window
        (2, 1, 64, 128, None, torch.bfloat16, torch.float32),  # MHA, fp32 new rows
    ],
)
def test_step_stores_rows_as_quantize_rows_then_attends(hkv, group, dk, dv, window, q_dtype, new_dtype):
    ops = _ops()
    lens = [1, 17, 40, 16, 33]  # page boundaries on both sides, a first token
    q, k, v, kc, vc, slots, tables, ctx = _step(hkv, group, dk, dv, lens, q_dtype, new_dtype, pad=2)
    want_k, want_v = kc.clone(), vc.clone()
    out = ops.paged_decode_step(q, k, v, kc, vc, slots, tables, ctx, PAGE, dk**-0.5, window or 0)
    real = len(lens)
    # the cache as the torch path's store would leave it: the real rows quantized by kv_quant
    want_k[:, slots[:real]] = kv_quant.quantize_rows(k[:real]).transpose(0, 1)
    want_v[:, slots[:real]] = kv_quant.quantize_rows(v[:real]).transpose(0, 1)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert out.shape == (real + 2, hkv * group * dv) and out.dtype == q_dtype
    want = _want(q[:real], kc, vc, tables[:real], ctx[:real], dk**-0.5, window)
    assert _err(out[:real].view(real, -1, dv), want) < TOL[q_dtype]
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))  # a padding row reads nothing


def _edge_rows(width: int) -> torch.Tensor:
    """[rows, width] fp32: random rows of several magnitudes, an all-zero row, rows with NaN / inf /
    -inf, rows whose x / scale fall exactly on .5 (ties: to even), a row whose largest magnitude is
    negative, one non-zero value, tiny and huge rows."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(width, generator=g) * s for s in (1e-3, 0.1, 1.0, 30.0, 1e4)]
    rows.append(torch.zeros(width))
    for bad in (float("nan"), float("inf"), float("-inf")):
        row = torch.randn(width, generator=g)
        row[width // 3] = bad
        rows.append(row)
    # amax 127 * 2^-4: scale exactly 2^-4, so (n + 0.5) * 2^-4 / scale = n + 0.5 exactly
    ties = (torch.arange(width) % 9 - 4 + 0.5) * 2.0**-4
    ties[0] = 127 * 2.0**-4
    rows += [ties, -ties]
    negative = torch.randn(width, generator=g)
    negative[5] = -10.0
    rows.append(negative)
    one = torch.zeros(width)
    one[7] = 0.3
    rows.append(one)
    rows.append(torch.randn(width, generator=g) * 1e-30)
    # subnormals whose amax / 127 underflows to a 0 scale (fp32 rows; bf16 rounds them to 0)
    rows.append(torch.tensor([1e-44, 0.0, -1e-44, 5e-45] * (width // 4)))
    rows.append(torch.randn(width, generator=g) * 1e36)
    return torch.stack(rows)


@pytest.mark.parametrize("new_dtype", [torch.float32, torch.bfloat16])
def test_step_store_is_byte_identical_to_quantize_rows(new_dtype):
    """Rows stored by the C++ step and by `kv_quant.quantize_rows` are the same bytes: codes
    (rounded half to even, clamped) and the scale (0 for a zero row, NaN for a non-finite one)."""
    ops = _ops()
    rows = _edge_rows(64).to(new_dtype)
    n = rows.shape[0]
    pages = -(-2 * n // PAGE)
    kc = torch.zeros(1, pages * PAGE, 64 + SCALE_BYTES, dtype=torch.int8)
    vc = torch.zeros(1, pages * PAGE, 32 + SCALE_BYTES, dtype=torch.int8)
    slots = torch.arange(n) * 2 + 1  # every other slot: the ones between stay untouched
    tables = torch.arange(pages).expand(n, -1).contiguous()
    ctx = torch.zeros(n, dtype=torch.long)  # store only: nothing read
    q = torch.zeros(n, 1, 64)
    v = rows[:, None, 16:48]
    ops.paged_decode_step(q, rows[:, None], v, kc, vc, slots, tables, ctx, PAGE, 0.125)
    want_k = kv_quant.quantize_rows(rows)
    want_v = kv_quant.quantize_rows(v[:, 0])
    assert torch.equal(kc[0, slots], want_k), (kc[0, slots] != want_k).nonzero()[:4]
    assert torch.equal(vc[0, slots], want_v)
    assert torch.equal(kc[0, slots - 1], torch.zeros_like(want_k))  # nothing else written


def test_bad_input_is_refused_naming_the_tensor():
    ops = _ops()
    q, k, v, kc, vc, slots, tables, ctx = _step(2, 2, 64, 64, [5, 20], torch.float32, torch.float32)
    # the once-per-step check is the same for an int8 cache: its slots are the cache's dim 1
    ops.check_decode_step(slots, tables, ctx, PAGE, kc.shape[1])
    bad_slots = slots.clone()
    bad_slots[0] = kc.shape[1]
    with pytest.raises(RuntimeError, match=r"slot_mapping\[0\]"):
        ops.check_decode_step(bad_slots, tables, ctx, PAGE, kc.shape[1])
    bad_tables = tables.clone()
    bad_tables[1, 1] = kc.shape[1] // PAGE
    with pytest.raises(RuntimeError, match="page id"):
        ops.check_decode_step(slots, bad_tables, ctx, PAGE, kc.shape[1])
    # the new rows have the values per row, not the cache's last dim
    with pytest.raises(RuntimeError, match=r"k must be \[tokens, 2, 64\]"):
        ops.paged_decode_step(q, kc.new_zeros(3, 2, 68).float(), v, kc, vc, slots, tables, ctx, PAGE, 0.125)
    with pytest.raises(RuntimeError, match="needs its own value_cache"):
        ops.paged_decode_step(q, k, v, kc, None, slots, tables, ctx, PAGE, 0.125)
    with pytest.raises(RuntimeError, match="both int8"):
        ops.paged_decode_step(q, k, v, kc, vc[..., :64].float(), slots, tables, ctx, PAGE, 0.125)
    with pytest.raises(
        RuntimeError, match=r"key width 64 \(the int8 key cache's last dim less its 4 scale bytes\)"
    ):
        ops.paged_decode_attention(q.new_zeros(3, 4, 68), kc, vc, tables, ctx, PAGE, 0.125)
    with pytest.raises(RuntimeError, match="must exceed 4"):
        ops.paged_decode_attention(q, kc, vc[..., :4], tables, ctx, PAGE, 0.125)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ops.paged_decode_attention(q, kc, vc[..., :60], tables, ctx, PAGE, 0.125)  # 56 values per row
    with pytest.raises(ValueError, match="needs its own value_cache"):  # the torch path's op says it too
        custom_ops._paged_decode_attention(q, k, v, kc, None, slots, 0, PAGE, 0.125)


def test_the_fakes_give_the_values_per_row():
    ops = _ops()
    q, k, v, kc, vc, slots, tables, ctx = _step(2, 3, 64, 32, [5, 20], torch.float32, torch.bfloat16)
    step_args = (q, k, v, kc, vc, slots, tables, ctx, PAGE, 0.125, 0)
    torch.library.opcheck(ops.paged_decode_step, step_args, test_utils=("test_schema", "test_faketensor"))
    attend_args = (q, kc, vc, tables, ctx, PAGE, 0.125)
    torch.library.opcheck(
        ops.paged_decode_attention, attend_args, test_utils=("test_schema", "test_faketensor")
    )
    assert ops.paged_decode_attention(*attend_args).shape == (3, 6, 32)


def test_kernel_choice_for_int8_caches_both_ways(monkeypatch):
    _ops()
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 32, 64 + SCALE_BYTES, dtype=torch.int8)  # 64 values per row
    assert decode_kernel.decode_kernel_reason(q, cache, cache) is None
    assert decode_kernel.decode_kernel_reason(q.float(), cache, cache) is None
    assert decode_kernel.step_kernel_reason(torch.bfloat16, 64, 64, cache_dtype=torch.int8) is None
    assert decode_kernel.step_kernel_reason(torch.float32, 128, 64, "cpu", torch.int8) is None
    # the cache's last dim is not its width: 64 bytes of an int8 row are 60 values
    assert "multiples of 16, got 60 / 60" in str(
        decode_kernel.decode_kernel_reason(q[..., :60], cache[..., :64], cache[..., :64])
    )
    assert "multiples of 16, got 68 / 64" in str(
        decode_kernel.step_kernel_reason(torch.bfloat16, 68, 64, cache_dtype=torch.int8)
    )
    mixed = decode_kernel.decode_kernel_reason(q, cache, torch.zeros(2, 32, 64, dtype=torch.bfloat16))
    assert "keys and values alike" in str(mixed) and "cache torch.int8 / torch.bfloat16" in str(mixed)
    assert "bfloat16 / float32 queries" in str(decode_kernel.step_kernel_reason(torch.int8, 64, 64))
    assert "not cuda" in str(decode_kernel.step_kernel_reason(torch.bfloat16, 64, 64, "cuda", torch.int8))
    # an int8 cache runs the AVX2 kernel on every CPU (AVX-512 ones too)
    chosen = decode_kernel.describe_decode_attention(torch.device("cpu"), torch.bfloat16, 64, 64, torch.int8)
    assert chosen == {"kernel": "cpu_avx2 (anyquant_cpu::paged_decode_attention)", "reason": None}
    assert decode_kernel.kernel_isa(True) == "avx2"
    monkeypatch.setattr(decode_kernel._Setting, "mode", "torch")
    assert decode_kernel.decode_kernel_reason(q, cache, cache) == "ANYQUANT_DECODE_ATTENTION=torch"
    assert decode_kernel.step_kernel_reason(torch.bfloat16, 64, 64, cache_dtype=torch.int8) == (
        "ANYQUANT_DECODE_ATTENTION=torch"
    )
    torch_path = decode_kernel.describe_decode_attention(
        torch.device("cpu"), torch.bfloat16, 64, 64, torch.int8
    )
    assert torch_path["kernel"] == "torch"
