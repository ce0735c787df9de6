"""The C++ paged decode attention kernel against float64 attention computed by its definition.

Each case builds a paged cache with sequences whose pages are scattered over it, runs the kernel
once over the whole batch, and compares every sequence's output with softmax(q K^T * scale) V
over that sequence's gathered keys in float64 (repeated per query head, so GQA is checked
against plain multi-head attention). Also: the choice between the kernel and the pure-torch path,
both ways, and the errors for bad block tables.
"""

from __future__ import annotations

import pytest
import torch

from anyquant.engine.kv_cache import PagedAttention, PagedKVCache
from anyquant.layers import attention, decode_kernel
from anyquant.quant.kernels import cpu_ext
from tests.helpers.threads import torch_threads

PAGE = 16


def _ops():
    reason = decode_kernel._cpu_reason()
    if reason is not None:
        pytest.skip(reason)
    return cpu_ext.ops()


def _reference(q, kc, vc, tables, lens, scale, window, page=PAGE):
    """float64 [B, H, Dv]: per sequence, its keys gathered slot by slot, K/V repeated per head."""
    b_count, h, _ = q.shape
    group = h // kc.shape[0]
    out = torch.zeros(b_count, h, vc.shape[-1], dtype=torch.float64)
    for b in range(b_count):
        n = int(lens[b])
        first = max(n - window, 0) if window else 0
        if n == first:
            continue
        pos = torch.arange(first, n)
        slots = tables[b][pos // page] * page + pos % page
        k = kc[:, slots].double().repeat_interleave(group, 0)  # [H, S, Dk]
        v = vc[:, slots].double().repeat_interleave(group, 0)
        p = (torch.einsum("hd,hsd->hs", q[b].double(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hs,hsd->hd", p, v)
    return out


def _case(hkv, group, dk, dv, lens, dtype, seed=0, page=PAGE):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // page) for n in lens) + 1
    num_pages = len(lens) * width + 3
    kc = torch.randn(hkv, num_pages * page, dk, generator=g).to(dtype)
    vc = torch.randn(hkv, num_pages * page, dv, generator=g).to(dtype)
    order = torch.randperm(num_pages, generator=g)  # pages scattered over the cache
    tables = order[: len(lens) * width].view(len(lens), width).contiguous()
    q = (torch.randn(len(lens), hkv * group, dk, generator=g) * 2).to(dtype)
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.long)


# bf16 outputs are rounded to bf16 (2^-9 relative) and the bf16 path multiplies the probabilities
# in bf16 as the torch path does; fp32 is fp32 arithmetic throughout.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("hkv", "group", "dk", "dv"),
    [(2, 7, 64, 64), (4, 1, 128, 128), (2, 2, 80, 80), (1, 16, 576, 512)],
    ids=["gqa7-d64", "mha-d128", "gqa2-d80", "mla-576-512"],
)
@pytest.mark.parametrize("window", [None, 37])
def test_matches_float64(dtype, hkv, group, dk, dv, window):
    ops = _ops()
    lens = [1, 15, 16, 17, 300, 33]  # page boundaries either side, mixed lengths in one batch
    q, kc, vc, tables, lens_t = _case(hkv, group, dk, dv, lens, dtype)
    scale = dk**-0.5
    want = _reference(q, kc, vc, tables, lens_t, scale, window)
    for splits in (0, 1, 3):  # 3: partial chunks merged by their log-sum-exp weights
        out = ops.paged_decode_attention(q, kc, vc, tables, lens_t, PAGE, scale, window or 0, splits)
        assert out.dtype == dtype and out.shape == (len(lens), hkv * group, dv)
        err = (out.double() - want).abs().max().item()
        assert err < TOL[dtype], (splits, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [3, 5, 8])
def test_running_max_rising_block_after_block(dtype, group):
    """Scores that grow along the context: every block of keys raises the running max, so the
    earlier blocks' sums and outputs are rescaled each time (the common case, a max that holds,
    skips that); 70 and 333 keys end in partial blocks and straddle pages."""
    ops = _ops()
    q, kc, vc, tables, lens = _case(2, group, 64, 64, [333, 70], dtype, seed=4)
    q = torch.ones_like(q)
    ramp = torch.zeros(kc.shape[1])
    for b, n in enumerate(lens.tolist()):  # key position i of sequence b scores ~ i / 8
        pos = torch.arange(n)
        ramp[tables[b][pos // PAGE] * PAGE + pos % PAGE] = pos / (8.0 * kc.shape[-1])
    kc = (kc.float() * 0.05 + ramp[None, :, None]).to(dtype)
    want = _reference(q, kc, vc, tables, lens, 1.0, None)
    for splits in (1, 2):
        out = ops.paged_decode_attention(q, kc, vc, tables, lens, PAGE, 1.0, 0, splits)
        assert (out.double() - want).abs().max().item() < TOL[dtype], splits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [1, 2, 3, 5, 6, 9, 13])
def test_block_edges_and_head_tiles(dtype, group):
    """Lengths either side of one, two and three blocks of 32 keys (partial blocks, a lone key in a
    block, whole blocks), group sizes that leave a single head or 1-3 heads over from the kernels'
    tiles of 2 and 4 heads (and more than 8 heads: bf16 rows widened once per block), and key and
    value widths that differ (80: a 16-value tail after 32-value passes)."""
    ops = _ops()
    lens = [31, 32, 33, 1, 63, 64, 65, 95, 96, 97, 130]
    q, kc, vc, tables, lens_t = _case(1, group, 48, 80, lens, dtype, seed=11)
    want = _reference(q, kc, vc, tables, lens_t, 48**-0.5, None)
    for splits in (0, 1, 3):
        out = ops.paged_decode_attention(q, kc, vc, tables, lens_t, PAGE, 48**-0.5, 0, splits)
        assert (out.double() - want).abs().max().item() < TOL[dtype], splits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("group", [7, 16])
def test_a_non_finite_key_makes_its_sequence_nan(dtype, bad, group):
    """A key row of NaN or infinite values (scores NaN: inf times query values of both signs), in a
    later block than the first (the running max already set by finite scores): every output of its
    sequence's query heads is NaN, as in the torch path, and the other sequences are untouched."""
    ops = _ops()
    lens = [70, 45]
    q, kc, vc, tables, lens_t = _case(1, group, 64, 64, lens, dtype, seed=12)
    want = _reference(q, kc, vc, tables, lens_t, 0.125, None)
    slot = int(tables[0][40 // PAGE]) * PAGE + 40 % PAGE  # key 40 of sequence 0: the second block
    kc[0, slot] = bad
    for splits in (0, 1):
        out = ops.paged_decode_attention(q, kc, vc, tables, lens_t, PAGE, 0.125, 0, splits)
        assert out[0].isnan().all(), splits
        assert (out[1].double() - want[1]).abs().max().item() < TOL[dtype], splits


def test_value_stored_inside_the_key():
    """The latent cache stores the value once, as the key's first 512 of 576 (a strided view):
    the kernel reads it in place, with the same results as from a separate value cache."""
    ops = _ops()
    q, kc, _, tables, lens = _case(1, 16, 576, 512, [90, 41], torch.bfloat16, seed=5)
    inside = kc[..., :512]
    want = _reference(q, kc, inside, tables, lens, 576**-0.5, None)
    out = ops.paged_decode_attention(q, kc, inside, tables, lens, PAGE, 576**-0.5)
    assert torch.equal(
        out, ops.paged_decode_attention(q, kc, inside.contiguous(), tables, lens, PAGE, 576**-0.5)
    )
    assert (out.double() - want).abs().max().item() < TOL[torch.bfloat16]


def test_bf16_inputs_on_the_fp32_path_and_two_threads():
    ops = _ops()
    q, kc, vc, tables, lens = _case(2, 7, 64, 64, [700, 5, 1200], torch.bfloat16, seed=1)
    want = _reference(q, kc, vc, tables, lens, 0.125, None)
    for n in (1, 2):  # 2 threads: the kernel splits the keys itself (splits=0)
        with torch_threads(n):
            for force_fp32 in (False, True):
                out = ops.paged_decode_attention(q, kc, vc, tables, lens, PAGE, 0.125, 0, 0, force_fp32)
                assert (out.double() - want).abs().max().item() < TOL[torch.bfloat16], (n, force_fp32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("hkv", "group", "dk", "dv"),
    [(2, 7, 64, 64), (4, 1, 64, 64), (2, 3, 80, 80), (1, 16, 576, 512)],
    ids=["gqa7", "mha", "gqa3-d80", "mla"],
)
@pytest.mark.parametrize("window", [None, 301])
def test_long_context_among_short_ones_split_over_threads(dtype, hkv, group, dk, dv, window):
    """One long context among short and empty ones: with 2 or 3 threads the kernel cuts the long
    one into chunks (whole blocks of keys but the last, an odd length) that the threads share by
    key count, writes the unsplit sequences' rows from their single item and merges the chunks;
    every thread count gives float64's attention."""
    ops = _ops()
    lens = [1, 2047, 0, 129, 17, 600]
    q, kc, vc, tables, lens_t = _case(hkv, group, dk, dv, lens, dtype, seed=6)
    scale = dk**-0.5
    want = _reference(q, kc, vc, tables, lens_t, scale, window)
    for n in (1, 2, 3):
        with torch_threads(n):
            # splits 0: the kernel's own chunks; 16: enough partial rows to merge on the threads
            for splits in (0, 16):
                out = ops.paged_decode_attention(q, kc, vc, tables, lens_t, PAGE, scale, window or 0, splits)
                assert torch.equal(out[2], torch.zeros_like(out[2]))  # no keys
                assert (out.double() - want).abs().max().item() < TOL[dtype], (n, splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("page", [1, 5, 32, 128])
def test_page_sizes_and_many_sequences_of_different_lengths(dtype, page):
    """Pages of 1 key (every key on its own page), of an odd 5 (blocks of keys straddle pages
    mid-block), and larger than a block; twelve sequences of lengths around the blocks and pages, a
    4096-key one among them, on 1 and 2 threads (the long one cut into chunks) and forced splits."""
    ops = _ops()
    lens = [4096, 1, 7, 8, 9, 31, 33, 64, 127, 0, 517, 250]
    q, kc, vc, tables, lens_t = _case(2, 3, 64, 64, lens, dtype, seed=7, page=page)
    scale = 64**-0.5
    for window in (None, 100):
        want = _reference(q, kc, vc, tables, lens_t, scale, window, page)
        for n in (1, 2):
            with torch_threads(n):
                for splits in (0, 5):
                    out = ops.paged_decode_attention(
                        q, kc, vc, tables, lens_t, page, scale, window or 0, splits
                    )
                    assert (out.double() - want).abs().max().item() < TOL[dtype], (window, n, splits)


def test_fp32_queries_on_a_bf16_cache_and_an_empty_context():
    ops = _ops()
    q, kc, vc, tables, lens = _case(1, 4, 64, 64, [0, 40], torch.bfloat16, seed=2)
    q = q.float()
    out = ops.paged_decode_attention(q, kc, vc, tables, lens, PAGE, 0.125)
    assert out.dtype == torch.float32
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no keys: nothing to attend to
    assert (out.double() - _reference(q, kc, vc, tables, lens, 0.125, None)).abs().max() < 2e-5


def test_bad_block_tables_are_refused_with_a_reason():
    ops = _ops()
    q, kc, vc, tables, lens = _case(2, 2, 64, 64, [20, 20], torch.float32)
    bad = tables.clone()
    bad[1, 1] = kc.shape[1] // PAGE  # one past the last page
    with pytest.raises(RuntimeError, match=r"sequence 1: page id .* outside the cache"):
        ops.paged_decode_attention(q, kc, vc, bad, lens, PAGE, 0.125)
    with pytest.raises(RuntimeError, match=r"context of .* keys but"):
        ops.paged_decode_attention(q, kc, vc, tables[:, :1], lens, PAGE, 0.125)
    with pytest.raises(RuntimeError, match="not a multiple of KV heads"):
        ops.paged_decode_attention(q[:, :3], kc, vc, tables, lens, PAGE, 0.125)
    with pytest.raises(RuntimeError, match="block_tables must be int64"):
        ops.paged_decode_attention(q, kc, vc, tables.int(), lens, PAGE, 0.125)
    with pytest.raises(RuntimeError, match="scale must be a positive"):
        ops.paged_decode_attention(q, kc, vc, tables, lens, PAGE, 0.0)


def test_kernel_choice_is_pinned_both_ways(monkeypatch):
    _ops()
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 32, 64, dtype=torch.bfloat16)
    assert decode_kernel.decode_kernel_reason(q, cache, cache) is None  # AVX-512 or AVX2 + FMA
    assert "multiples of 16" in str(
        decode_kernel.decode_kernel_reason(q[..., :8], cache[..., :8], cache[..., :8])
    )
    half = cache.half()
    assert "bfloat16 / float32" in str(decode_kernel.decode_kernel_reason(q.half(), half, half))
    monkeypatch.setattr(decode_kernel._Setting, "mode", "torch")
    assert decode_kernel.decode_kernel_reason(q, cache, cache) == "ANYQUANT_DECODE_ATTENTION=torch"
    with pytest.raises(ValueError, match="ANYQUANT_DECODE_ATTENTION"):
        decode_kernel.set_decode_kernel("fast")


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("chunk", [6, 40])  # 14 / 2 heads: rows up to 4 x 7 = 28 take the kernel
def test_engine_step_takes_the_kernel_and_matches_the_torch_path(monkeypatch, window, chunk):
    """A step with decode rows and a prefill chunk on a cached prefix: decode rows go through the
    kernel (spied), a short chunk too (as one decode row per new token), a longer one through SDPA;
    the step's output equals the pure-torch path's (float32 cache, same plan)."""
    _ops()
    torch.manual_seed(3)
    cache = PagedKVCache(1, 40, PAGE, 2, 64, 64, torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    # (pages, cached tokens, new tokens): two decoding sequences on scattered pages, one prefill
    seqs = [([7, 3, 30, 12], 50, 1), ([1, 2], 9, 1), ([20, 5, 8, 9], 18, chunk)]
    t = sum(n for _, _, n in seqs)
    q, k, v = torch.randn(t, 14, 64), torch.randn(t, 2, 64), torch.randn(t, 2, 64)
    calls = []
    real = attention.paged_decode
    monkeypatch.setattr(attention, "paged_decode", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    out = PagedAttention.for_sequences(cache, seqs).attend(0, q, k, v, 0.125, window)
    assert calls == ([2, chunk] if chunk <= 28 else [2])  # rows per call
    monkeypatch.setattr(decode_kernel._Setting, "mode", "torch")
    want = PagedAttention.for_sequences(cache, seqs).attend(0, q, k, v, 0.125, window)
    assert len(calls) <= 2  # the torch path did not call the kernel
    assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_chunks_on_cached_prefixes_match_float64(window):
    """Two sequences, each a chunk of new tokens after a cached prefix (the last page part full,
    pages scattered), only prefill in the step: every new token attends causally (its own key
    included, within the window) to the cache in place, as in float64 over the gathered keys."""
    _ops()
    torch.manual_seed(4)
    cache = PagedKVCache(1, 24, PAGE, 2, 64, 64, torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    seqs = [([11, 4, 17], 30, 7), ([2, 19], 13, 3)]
    t = sum(n for _, _, n in seqs)
    q, k, v = torch.randn(t, 8, 64), torch.randn(t, 2, 64), torch.randn(t, 2, 64)
    out = PagedAttention.for_sequences(cache, seqs).attend(0, q, k, v, 0.125, window)
    at = 0
    for pages, cached, n in seqs:
        pos = torch.arange(cached + n)
        slots = torch.tensor(pages)[pos // PAGE] * PAGE + pos % PAGE
        keys = cache.k[0][:, slots].double().repeat_interleave(4, 0)  # [H, S, D], after the store
        values = cache.v[0][:, slots].double().repeat_interleave(4, 0)
        for i in range(n):
            p = cached + i  # the query's position
            seen = (pos <= p) & ((pos > p - window) if window else True)
            scores = torch.einsum("hd,hsd->hs", q[at + i].double(), keys[:, seen]) * 0.125
            want = torch.einsum("hs,hsd->hd", scores.softmax(-1), values[:, seen]).reshape(-1)
            assert (out[at + i].double() - want).abs().max() < 2e-5, (pages, i)
        at += n


def test_inspect_names_the_decode_attention(monkeypatch):
    _ops()
    cpu = torch.device("cpu")
    chosen = decode_kernel.describe_decode_attention(cpu, torch.bfloat16, 576, 512)  # MLA latent cache
    isa = "avx512" if torch.cpu._is_avx512_supported() else "avx2"  # torch's CPU check, not the kernel's
    assert chosen == {"kernel": f"cpu_{isa} (anyquant_cpu::paged_decode_attention)", "reason": None}
    fallback = decode_kernel.describe_decode_attention(cpu, torch.float16, 64, 64)
    assert fallback["kernel"] == "torch" and "float16" in fallback["reason"]
    monkeypatch.setattr(decode_kernel._Setting, "mode", "torch")
    assert decode_kernel.describe_decode_attention(cpu, torch.bfloat16, 64, 64)["kernel"] == "torch"


def test_a_decode_step_on_the_kernel_builds_no_mask(monkeypatch):
    """The masks of the pure-torch path grow with the context (batch x keys per step): a decode
    step that the kernel runs never builds them (nor its page plan: each layer is one
    `paged_decode_step` call); the torch path builds them on first use."""
    _ops()
    torch.manual_seed(5)
    cache = PagedKVCache(1, 8, PAGE, 2, 64, 64, torch.bfloat16)
    seqs = [([3, 1], 20, 1), ([5], 7, 1)]
    q, k, v = (torch.randn(2, h, 64, dtype=torch.bfloat16) for h in (8, 2, 2))
    ctx = PagedAttention.for_sequences(cache, seqs)
    out = ctx.attend(0, q, k, v, 0.125)
    assert ctx.step_tensors is not None and ctx._plans == {}
    monkeypatch.setattr(decode_kernel._Setting, "mode", "torch")
    want = PagedAttention.for_sequences(cache, seqs).attend(0, q, k, v, 0.125)
    assert torch.allclose(out.float(), want.float(), atol=2e-2)
    torch_ctx = PagedAttention.for_sequences(cache, seqs)
    torch_ctx.attend(0, q, k, v, 0.125)
    built = torch_ctx._plans[None].decode
    assert built is not None and built.mask.shape == (1, 2, 1, 32) and "_built" in vars(built)
