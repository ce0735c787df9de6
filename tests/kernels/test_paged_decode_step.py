"""`anyquant_cpu::paged_decode_step`, a captured decode step's attention layer in one C++ call:
the layer's new keys / values stored at their slots, then the decode attention through the step's
block tables, against the cache written slot by slot and float64 attention by its definition.

Also the once-per-step check of the step's metadata (`check_decode_step`), and the op's fake
(shape-only) implementation against the real op (`torch.library.opcheck`).
"""

from __future__ import annotations

import pytest
import torch

from anyquant.layers import custom_ops, decode_kernel
from anyquant.quant.kernels import cpu_ext
from tests.kernels.test_paged_decode_kernel import PAGE, _case, _reference


def _ops():
    reason = decode_kernel._cpu_reason()
    if reason is not None:
        pytest.skip(reason)
    custom_ops.register_extension_fakes()
    return cpu_ext.ops()


def _step(hkv, group, dk, dv, lens, dtype, latent=False, pad=1, new_dtype=None):
    """A step of len(lens) decoding sequences (context lens[b], the new token last) and `pad`
    padding rows (slot -1, context 0), the new rows' k / v in `new_dtype` (default: the cache's)."""
    q, kc, vc, tables, ctx = _case(hkv, group, dk, dv, lens, dtype)
    if latent:
        vc = kc[..., :dv]  # the value is the key's prefix
    b = len(lens)
    pos = ctx - 1
    slots = tables[torch.arange(b), pos // PAGE] * PAGE + pos % PAGE
    g = torch.Generator().manual_seed(7)
    k = torch.randn(b + pad, hkv, dk, generator=g).to(new_dtype or dtype)
    v = k[..., :dv] if latent else torch.randn(b + pad, hkv, dv, generator=g).to(new_dtype or dtype)
    q = torch.cat([q, torch.randn(pad, q.shape[1], dk, generator=g).to(dtype)])
    tables = torch.cat([tables, tables.new_zeros(pad, tables.shape[1])])  # padding: never read
    slots = torch.cat([slots, slots.new_full((pad,), -1)])
    ctx = torch.cat([ctx, ctx.new_zeros(pad)])
    return q, k, v, kc, vc, slots, tables, ctx


@pytest.mark.parametrize(
    ("hkv", "group", "dk", "dv", "window", "dtype", "new_dtype"),
    [
        (2, 7, 64, 64, None, torch.float32, None),  # Qwen2.5-0.5B's GQA-7, fp32
        (2, 7, 64, 64, None, torch.bfloat16, None),  # bf16
        (4, 2, 32, 32, 20, torch.float32, None),  # a sliding window
        (2, 1, 16, 16, None, torch.bfloat16, torch.float32),  # MHA, fp32 rows into a bf16 cache
        (2, 4, 64, 64, 5, torch.float32, torch.bfloat16),  # bf16 rows into an fp32 cache, window
    ],
)
def test_stores_the_real_rows_then_attends_as_float64(hkv, group, dk, dv, window, dtype, new_dtype) -> None:
    ops = _ops()
    lens = [1, 17, 40, 16, 33]  # page boundaries on both sides, a first token
    q, k, v, kc, vc, slots, tables, ctx = _step(hkv, group, dk, dv, lens, dtype, new_dtype=new_dtype)
    before_k, before_v = kc.clone(), vc.clone()
    out = ops.paged_decode_step(q, k, v, kc, vc, slots, tables, ctx, PAGE, dk**-0.5, window or 0)
    real = len(lens)
    # The cache as index_copy_ of the real rows (cast to the cache's dtype) would leave it.
    want_k, want_v = before_k.clone(), before_v.clone()
    want_k[:, slots[:real]] = k[:real].transpose(0, 1).to(dtype)
    want_v[:, slots[:real]] = v[:real].transpose(0, 1).to(dtype)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert out.shape == (real + 1, hkv * group * dv) and out.dtype == dtype
    want = _reference(q[:real], kc, vc, tables[:real], ctx[:real], dk**-0.5, window)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out[:real].view(real, -1, dv).double(), want, atol=tol, rtol=tol)
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))  # a padding row reads nothing


def test_latent_cache_stores_the_key_and_reads_its_prefix_as_the_value() -> None:
    """DeepSeek's absorbed decode: one latent KV head, keys of 576 = 512 latent + 64 rope, the
    value the key's first 512 values (no value cache passed)."""
    ops = _ops()
    lens = [9, 33]
    q, k, v, kc, _, slots, tables, ctx = _step(1, 16, 576, 512, lens, torch.float32, latent=True)
    before = kc.clone()
    out = ops.paged_decode_step(q, k, v, kc, None, slots, tables, ctx, PAGE, 576**-0.5)
    want_k = before.clone()
    want_k[:, slots[:2]] = k[:2].transpose(0, 1)
    assert torch.equal(kc, want_k)
    want = _reference(q[:2], kc, kc[..., :512], tables[:2], ctx[:2], 576**-0.5, None)
    assert torch.allclose(out[:2].view(2, 16, 512).double(), want, atol=1e-5)


def test_the_fake_matches_the_op() -> None:
    ops = _ops()
    for latent in (False, True):
        dv = 32 if latent else 64
        q, k, v, kc, vc, slots, tables, ctx = _step(2, 3, 64, dv, [5, 20], torch.float32, latent=latent)
        args = (q, k, v, kc, None if latent else vc, slots, tables, ctx, PAGE, 0.125, 0)
        torch.library.opcheck(ops.paged_decode_step, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_step_metadata_is_refused_once_per_step_naming_the_tensor() -> None:
    ops = _ops()
    q, k, v, kc, vc, slots, tables, ctx = _step(2, 2, 16, 16, [5, 20], torch.float32)
    page_count = kc.shape[1] // PAGE
    ops.check_decode_step(slots, tables, ctx, PAGE, kc.shape[1])  # the good step passes
    bad_slots = slots.clone()
    bad_slots[0] = kc.shape[1]
    with pytest.raises(RuntimeError, match=r"slot_mapping\[0\]"):
        ops.check_decode_step(bad_slots, tables, ctx, PAGE, kc.shape[1])
    bad_tables = tables.clone()
    bad_tables[1, 1] = page_count
    with pytest.raises(RuntimeError, match="page id"):
        ops.check_decode_step(slots, bad_tables, ctx, PAGE, kc.shape[1])
    too_long = ctx.clone()
    too_long[0] = tables.shape[1] * PAGE + 1
    with pytest.raises(RuntimeError, match="context of"):
        ops.check_decode_step(slots, tables, too_long, PAGE, kc.shape[1])
    with pytest.raises(RuntimeError, match="block_tables must be"):
        ops.check_decode_step(slots, tables.int(), ctx, PAGE, kc.shape[1])
    # The per-layer op checks shapes and dtypes (no values) with the tensor's name.
    with pytest.raises(RuntimeError, match="context_lens must be"):
        ops.paged_decode_step(q, k, v, kc, vc, slots, tables, ctx[:1], PAGE, 0.25)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.paged_decode_step(q, k[:, :1], v, kc, vc, slots, tables, ctx, PAGE, 0.25)
