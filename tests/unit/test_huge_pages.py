"""Streamed weights in transparent huge pages (utils/huge_pages.py): what moves, that the values
and shapes survive, that the memory is advised (and, where the kernel grants them, backed) as
huge pages, that views and small tensors stay, and that nothing moves where THP is off."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from anyquant import LLM
from anyquant.quant.kernels.avx512 import Avx512DenseLmHeadKernel, Avx512WeightOnlyKernel
from anyquant.quant.kernels.avx512_vnni import Avx512VnniKernel
from anyquant.utils import huge_pages
from anyquant.utils.tiny_model import write_tiny_model

needs_thp = pytest.mark.skipif(
    huge_pages.unavailable_reason() is not None, reason="no transparent huge pages"
)


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address` (VmFlags "hg": MADV_HUGEPAGE)."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            if inside:
                break
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    assert fields, f"no mapping holds {address:#x}"
    return fields


class _Holder(nn.Module):
    def __init__(self, **buffers: torch.Tensor) -> None:
        super().__init__()
        for name, t in buffers.items():
            self.register_buffer(name, t, persistent=False)


@needs_thp
def test_relocate_keeps_values_and_advises_huge_pages() -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, generator=g).view(1536, 2048)
    odd = torch.randn(333, 17, generator=g)  # not a multiple of the 64-byte alignment
    scale = torch.randn(56, 7, 16, generator=g)
    holder = _Holder(big=big.clone(), odd=odd.clone(), scale=scale.clone())
    moved = huge_pages.relocate([(holder, "big"), (holder, "odd"), (holder, "scale")])
    assert moved >= big.nbytes + odd.nbytes + scale.nbytes
    for name, ref in (("big", big), ("odd", odd), ("scale", scale)):
        t = getattr(holder, name)
        assert t.dtype == ref.dtype and t.shape == ref.shape and t.is_contiguous()
        assert torch.equal(t, ref), name
        assert t.data_ptr() % 64 == 0
    assert holder.big.data_ptr() % huge_pages.HUGE_PAGE == 0  # the first tensor opens the arena
    mapping = _mapping_of(holder.big.data_ptr())
    assert "hg" in mapping["VmFlags"].split(), mapping["VmFlags"]
    # Touched 2 MiB ranges are backed by huge pages where the kernel has them (defrag=madvise
    # compacts for advised ranges): at least the first whole one.
    assert int(mapping["AnonHugePages"].split()[0]) >= 2048, mapping


@needs_thp
def test_the_mapping_goes_with_its_last_tensor() -> None:
    holder = _Holder(a=torch.ones(1 << 20), b=torch.ones(1 << 18))
    huge_pages.relocate([(holder, "a"), (holder, "b")])
    address = holder.a.data_ptr()
    kept = holder.b
    del holder
    gc.collect()
    assert "hg" in _mapping_of(address)["VmFlags"].split()  # `kept` still holds the arena
    del kept
    gc.collect()
    try:
        flags = _mapping_of(address)["VmFlags"].split()
    except AssertionError:  # unmapped
        flags = []
    assert "hg" not in flags  # gone (or the address reused by an ordinary mapping)


@needs_thp
def test_views_small_and_foreign_tensors_stay() -> None:
    stacked = torch.zeros(4, 8192)
    holder = _Holder(view=stacked[1], small=torch.ones(16), meta=torch.empty(8192, device="meta"))
    before = {name: getattr(holder, name) for name in ("view", "small", "meta")}
    assert (
        huge_pages.relocate([(holder, "view"), (holder, "small"), (holder, "meta"), (holder, "absent")]) == 0
    )
    for name, t in before.items():
        assert getattr(holder, name) is t


def test_nothing_moves_where_thp_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    assert huge_pages.thp_mode(setting) == "never"
    assert huge_pages.thp_mode(tmp_path / "absent") is None
    monkeypatch.setattr(huge_pages, "_THP_ENABLED", setting)
    huge_pages.unavailable_reason.cache_clear()
    try:
        reason = huge_pages.unavailable_reason()
        assert reason is not None and "never" in reason
        holder = _Holder(w=torch.ones(1 << 16))
        before = holder.w
        assert huge_pages.relocate([(holder, "w")]) == 0
        assert holder.w is before
    finally:
        huge_pages.unavailable_reason.cache_clear()


@needs_thp
def test_a_failed_mapping_leaves_the_weights_as_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(nbytes: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages, "HugePageArena", refuse)
    holder = _Holder(w=torch.ones(1 << 16))
    before = holder.w
    assert huge_pages.relocate([(holder, "w")]) == 0
    assert holder.w is before


def test_arena_refuses_more_than_it_holds() -> None:
    if huge_pages.unavailable_reason() is not None:
        pytest.skip("no transparent huge pages")
    arena = huge_pages.HugePageArena(100)
    arena.place(torch.ones(1 << 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="cannot hold"):
        arena.place(torch.ones(2 << 20, dtype=torch.uint8))


def _check_streamed_from_huge_pages(
    path: Path, options: dict[str, Any], kernel_types: tuple[type, ...]
) -> list:
    """Load `path`; every streamed buffer of the kernels of `kernel_types` sits in a huge-page
    mapping and the logits equal those of the same model loaded without the move (bit-exact).
    Returns the kernels (skips where none of those kernels runs on this CPU)."""
    llm = LLM(path, **options)
    kernels = [m for m in llm.loaded.model.modules() if isinstance(m, kernel_types)]
    if not kernels:
        pytest.skip(f"{', '.join(k.__name__ for k in kernel_types)} do not run on this CPU")
    for kernel in kernels:
        for name in kernel.streamed_buffers:
            t = getattr(kernel, name)
            if t is not None and t.nbytes >= huge_pages.MIN_BYTES:
                assert "hg" in _mapping_of(t.data_ptr())["VmFlags"].split(), (kernel, name)
    ids = [5, 99, 300, 17, 4, 1000]
    moved = llm.logits(ids)
    original = huge_pages.relocate
    try:
        huge_pages.relocate = lambda slots: 0  # type: ignore[assignment]
        plain = LLM(path, **options)
    finally:
        huge_pages.relocate = original  # type: ignore[assignment]
    assert "hg" not in _mapping_of(plain.loaded.model.lm_head.kernel.packed.data_ptr())["VmFlags"].split()
    assert torch.equal(moved, plain.logits(ids))
    return kernels


@needs_thp
def test_loaded_model_streams_from_huge_pages(tmp_path: Path) -> None:
    """The loader moves every AVX-512 kernel's weights and the LM head."""
    path = write_tiny_model(tmp_path, "llama", seed=3, hidden_size=128, head_dim=32, vocab_size=2048)
    options = {"dtype": "bfloat16", "enforce_eager": True}
    kernels = _check_streamed_from_huge_pages(
        path, options, (Avx512WeightOnlyKernel, Avx512DenseLmHeadKernel)
    )
    assert any(isinstance(k, Avx512DenseLmHeadKernel) for k in kernels)


@needs_thp
def test_int8_activation_kernels_stream_from_huge_pages(tmp_path: Path) -> None:
    """With int8 activations and the int8 head every layer runs on the VNNI kernel: its weights,
    scales and zero points move too."""
    path = write_tiny_model(tmp_path, "llama", seed=4, hidden_size=128, head_dim=32, vocab_size=2048)
    options = {
        "dtype": "bfloat16",
        "enforce_eager": True,
        "activation_dtype": "int8",
        "lm_head_dtype": "int8",
    }
    _check_streamed_from_huge_pages(path, options, (Avx512VnniKernel,))
