"""Custom ops that let `torch.compile` trace a whole decode step without a graph break.

Owns three things, registered with `torch.library` when a captured step is prepared (never at
`import anyquant`):
- fake (shape-only) implementations of the C++ extension's ops (`anyquant_cpu::gemv`,
  `tiled_mm`, the AVX2 and int8-activation linear ops, `moe_experts`, `moe_experts_avx2`,
  `paged_decode_attention`, `paged_decode_step`), so Dynamo traces the kernels that call them
  and Inductor calls them in place (`paged_decode_step` is a captured step's attention wherever
  the C++ decode kernel runs: K/V store and attention in one C++ call on the step's tables as
  graph inputs, see engine/capture.py);
- `anyquant::paged_decode_attention`, where it does not (the pure-torch attention): stores one
  decode step's keys/values in a layer's cache and attends through the step's page plan (the C++
  decode kernel where it runs, see layers/decode_kernel.py); the cache is declared mutated, so the
  graph keeps the write before every later read. A cache whose value is the key's prefix passes no value cache
  (two mutated arguments may not alias). The caches may be int8 (layers/kv_quant.py's rows: the
  last dim holds the scale's bytes too), so every output width here is the values per row
  (`kv_quant.row_width`, or the new rows' width), never a cache's last dim. The plan (pages read,
  mask) and the count of real rows are step metadata set by the runner before the graph runs
  (`set_decode_step`), once per step for every layer: the plan's shapes grow with the context, and
  passing it through the graph would recompile at every new page count or make every shape
  symbolic;
- `anyquant::opaque`: a callable whose Python depends on data (the per-expert MoE path sorts
  tokens with a host sync; the pure-torch kernels look at `data_ptr()`) runs as one op of the
  graph, which sees only its output's shape and dtype (`register_opaque`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from anyquant.layers import kv_quant

if TYPE_CHECKING:
    from anyquant.layers.attention import PagedGroup, PagedPlan

# What an opaque op's output looks like, from its inputs (run on fake tensors while tracing).
OutputSpec = Callable[[Sequence[Tensor]], Tensor]


class _Opaque:
    """The callables behind `anyquant::opaque`, by handle. Held weakly: a model that is dropped
    frees its modules, and a handle of a dropped callable fails loudly instead of running."""

    def __init__(self) -> None:
        self.entries: list[tuple[Callable[[], Callable[..., Tensor] | None], OutputSpec]] = []

    def add(self, owner: object, method: str, spec: OutputSpec) -> int:
        ref = weakref.ref(owner)

        def bound() -> Callable[..., Tensor] | None:
            target = ref()
            return None if target is None else getattr(target, method)

        self.entries.append((bound, spec))
        return len(self.entries) - 1

    def call(self, handle: int, args: Sequence[Tensor]) -> Tensor:
        fn = self.entries[handle][0]()
        if fn is None:
            raise RuntimeError(f"anyquant::opaque handle {handle}: its module no longer exists")
        return fn(*args)


_OPAQUE = _Opaque()


def register_opaque(owner: object, method: str, spec: OutputSpec) -> int:
    """A handle under which `opaque_call` runs `owner.<method>(*tensors)` as one graph op."""
    register_ops()
    return _OPAQUE.add(owner, method, spec)


def opaque_call(handle: int, *args: Tensor) -> Tensor:
    return torch.ops.anyquant.opaque(list(args), handle)


def _opaque(args: list[Tensor], handle: int) -> Tensor:
    out = _OPAQUE.call(handle, args)
    # An op's output may not alias its inputs: a callable that returned one is copied.
    return out.clone() if any(out.data_ptr() == a.data_ptr() for a in args) else out


def _opaque_fake(args: list[Tensor], handle: int) -> Tensor:
    return _OPAQUE.entries[handle][1](args)


def _paged_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_cache: Tensor,
    value_cache: Tensor | None,
    slot_mapping: Tensor,
    plan: int,
    page_size: int,
    scale: float,
) -> Tensor:
    """One query row per sequence -> [B, H * Dv]; the step's rows past its `real_rows` are a
    bucket's padding: nothing of theirs is stored, their output is dropped by the caller.
    `value_cache` None: the value is the key's first Dv values (a latent cache,
    engine/kv_cache.py), stored with the key. Runs once per layer: everything it needs of the
    step was prepared once by `set_decode_step`, and nothing here reads a tensor's values on the
    host (no sync)."""
    # Imported here: attention imports linear, which imports this module.
    from anyquant.layers.attention import paged_attention, store_key_value

    step = _STEP.current
    real = step.real_rows
    if real < slot_mapping.shape[0]:  # padding rows sit at the end (shapes are host ints)
        slot_mapping, k, v = slot_mapping[:real], k[:real], v[:real]
    if value_cache is None and kv_quant.is_quantized(key_cache):
        raise ValueError(
            "an int8 key_cache needs its own value_cache (an int8 row's scale is its whole key's)"
        )
    store_key_value(key_cache, value_cache, slot_mapping, k, v)
    if value_cache is None:
        value_cache = key_cache[..., : v.shape[-1]]
    return paged_attention(q, key_cache, value_cache, step.plans[plan], page_size, scale)


def _paged_decode_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_cache: Tensor,
    value_cache: Tensor | None,
    slot_mapping: Tensor,
    plan: int,
    page_size: int,
    scale: float,
) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * v.shape[-1])


_SCHEMAS: dict[str, tuple[str, Callable[..., Tensor], Callable[..., Tensor]]] = {
    "opaque": ("opaque(Tensor[] args, int handle) -> Tensor", _opaque, _opaque_fake),
    "paged_decode_attention": (
        "paged_decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) key_cache, Tensor(b!)? value_cache, "
        "Tensor slot_mapping, int plan, int page_size, float scale) -> Tensor",
        _paged_decode_attention,
        _paged_decode_attention_fake,
    ),
}


@functools.cache
def register_ops() -> torch.library.Library:
    """Define the anyquant:: ops (once per process). Through the low-level `Library` API, with
    CPU kernels only: `torch.library.custom_op` adds Python autograd and view-tracking layers
    around every call, measured at ~0.17 ms per attention call (4 ms of a 24-layer batch-1 step);
    a captured step runs under inference mode and needs neither."""
    lib = torch.library.Library("anyquant", "FRAGMENT")
    for name, (schema, kernel, fake) in _SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, kernel, "CPU")
        torch.library.register_fake(f"anyquant::{name}", fake, lib=lib)
    return lib


def paged_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_cache: Tensor,
    value_cache: Tensor | None,
    slot_mapping: Tensor,
    plan: int,
    page_size: int,
    scale: float,
) -> Tensor:
    """`plan`: which of the plans given to `set_decode_step` (one per sliding-window size)."""
    return torch.ops.anyquant.paged_decode_attention(
        q, k, v, key_cache, value_cache, slot_mapping, plan, page_size, scale
    )


@dataclass(frozen=True)
class DecodeStep:
    """What every `paged_decode_attention` of one captured step reads: the page plan of each
    window size (by index) and how many of the bucket's rows are real sequences."""

    plans: tuple[PagedPlan, ...]
    real_rows: int


class _CurrentStep(threading.local):
    """Per thread: a compiled step runs its ops on the thread that called it, so engines stepping
    on different threads each see their own step."""

    current: DecodeStep = DecodeStep((), 0)


_STEP = _CurrentStep()


def set_decode_step(groups: Sequence[PagedGroup], real_rows: int) -> None:
    """The current decode step, read by every `paged_decode_attention` of the step: one decode
    group per window size (`plan_paged_attention`), and the number of real rows (the rest of the
    bucket is padding)."""
    from anyquant.layers.attention import PagedPlan

    _STEP.current = DecodeStep(tuple(PagedPlan(group, None) for group in groups), real_rows)


def register_extension_fakes() -> None:
    """Shape-only implementations of the C++ extension's ops, once the extension is loaded (a
    model without C++ kernels may be prepared first: then nothing is registered yet)."""
    if hasattr(torch.ops.anyquant_cpu, "gemv"):
        _register_extension_fakes()


@functools.cache
def _register_extension_fakes() -> None:
    # The linear ops return [T, n] in x's dtype (bf16 or fp32); n is argument 8 (from 0) of the weight-only
    # ops' signature (x, packed, scale, zz, lut, bias, fmt, group, n[, tile_blocks]) and argument 9
    # of the int8-activation ops' (x, packed, scale, zero, zconst, offset, bias, fmt, group, n, ...).
    def linear_fake(n_at: int) -> Callable[..., Tensor]:
        def fake(x: Tensor, *args: object) -> Tensor:
            return x.new_empty(x.shape[0], int(args[n_at - 1]))  # type: ignore[call-overload]

        return fake

    weight_only = (
        "gemv",
        "gemm",
        "tiled_mm",
        "avx2_gemv",
        "avx2_few_rows_mm",
        "avx2_rows_mm",
        "avx2_tiled_mm",
    )
    for name, n_at in [*((op, 8) for op in weight_only), ("vnni_linear", 9), ("avx2_a8_linear", 9)]:
        if hasattr(torch.ops.anyquant_cpu, name):
            torch.library.register_fake(f"anyquant_cpu::{name}")(linear_fake(n_at))

    if hasattr(torch.ops.anyquant_cpu, "paged_decode_attention"):

        @torch.library.register_fake("anyquant_cpu::paged_decode_attention")
        def _paged_decode_fake(
            q,
            key_cache,
            value_cache,
            block_tables,
            context_lens,
            page_size,
            scale,
            window=0,
            splits=0,
            force_fp32=False,
        ):
            return q.new_empty(q.shape[0], q.shape[1], kv_quant.row_width(value_cache))

    if hasattr(torch.ops.anyquant_cpu, "paged_decode_step"):

        @torch.library.register_fake("anyquant_cpu::paged_decode_step")
        def _paged_decode_step_fake(
            q,
            k,
            v,
            key_cache,
            value_cache,
            slot_mapping,
            block_tables,
            context_lens,
            page_size,
            scale,
            window=0,
        ):
            return q.new_empty(q.shape[0], q.shape[1] * v.shape[-1])  # v: the new rows, values per row

    if hasattr(torch.ops.anyquant_cpu, "moe_experts"):

        @torch.library.register_fake("anyquant_cpu::moe_experts")
        def _(x, ids, weights, w13, s13, z13, w2, s2, z2, lut, fmt, group13, group2, inter, hidden):
            return x.new_empty(x.shape[0], hidden, dtype=torch.float32)

    if hasattr(torch.ops.anyquant_cpu, "moe_experts_avx2"):

        @torch.library.register_fake("anyquant_cpu::moe_experts_avx2")
        def _moe_experts_avx2_fake(
            x, ids, weights, w13, s13, z13, w2, s2, z2, lut, fmt, group13, group2, inter, hidden, *options
        ):
            return x.new_empty(x.shape[0], hidden, dtype=torch.float32)

    def moe_int8_fake(x: Tensor, ids: Tensor, weights: Tensor, *stacked_and_options: object) -> Tensor:
        return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)  # x is [T, hidden]

    for name in ("moe_experts_vnni", "moe_experts_avx2_a8"):  # the int8 fused calls: one signature
        if hasattr(torch.ops.anyquant_cpu, name):
            torch.library.register_fake(f"anyquant_cpu::{name}")(moe_int8_fake)
