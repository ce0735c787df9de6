"""The fp16 policy's guard: keep a bf16/fp32-trained model finite in float16 where it can, and
name the first layer where it cannot, at warm-up rather than in a user's answer.

Owns the range guard around linear kernels and the warm-up calibration. What fp16 cannot hold:
values beyond 65504. The residual stream and norms are fp32 already (models/base.py); what is
left is every linear layer's fp16 output and the MLP's act(gate) * up product. The guard

- wraps the MLP projections (gate/up, down) and the attention output projection, whose outputs
  only ever meet fp32 (the MLP product, formed in fp32 here, and the residual stream): a wrapped
  kernel sees its input scaled by 2^-shift (exact in binary floating point unless a value
  underflows) and returns fp32 output times 2^shift, so the fp16 result stays below the limit;
- picks each shift at warm-up from one calibration forward (a power of two that leaves
  `HEADROOM` between the largest value seen and 65504) and unwraps every layer that needs none;
- names the first module whose output is still not finite (q/k/v projections and attention
  write fp16 keys and values into the cache, MoE experts are fused: those are detected, not
  fixed) and fails the load with it.

The per-step logits check and `--debug-numerics` replay (engine/numerics.py) still catch what a
later prompt pushes over the limit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from anyquant.engine.kv_cache import SequenceCache
from anyquant.engine.numerics import first_nonfinite_module
from anyquant.errors import NumericsError
from anyquant.layers.attention import Attention
from anyquant.layers.linear import QuantLinear
from anyquant.layers.mlp import GatedMLP
from anyquant.loading.dtype_policy import FP16_MAX
from anyquant.loading.loader import LoadedModel
from anyquant.models.protocol import CausalLM
from anyquant.quant.kernels.base import LinearKernel
from anyquant.quant.spec import LayerKind, QuantSpec
from anyquant.quant.weight import QuantWeight

log = logging.getLogger(__name__)

# Room left between the largest value seen at warm-up and fp16's limit: prompts other than the
# calibration one can reach somewhat larger activations.
HEADROOM = 16.0
_LIMIT = FP16_MAX / HEADROOM
_MAX_SHIFT = 40  # 2^40: beyond any activation a trained model produces; fp32 holds it


def needed_shift(amax: float) -> int:
    """The smallest shift s >= 0 with amax * 2^-s <= 65504 / HEADROOM."""
    if not math.isfinite(amax):
        return _MAX_SHIFT
    return max(0, math.ceil(math.log2(amax / _LIMIT))) if amax > _LIMIT else 0


class RangeGuardKernel(LinearKernel):
    """A layer's kernel run on inputs scaled by 2^-shift, with fp32 outputs scaled back.

    The bias is added in fp32 after the scaling (the inner kernel gets none), so it is exact.
    Only installed by `guard_fp16` for weights without static activation scales (a scaled input
    would quantize differently against a fixed scale); dynamic activation scales scale along."""

    name = "fp16_range_guard"

    def __init__(self, inner: LinearKernel) -> None:
        super().__init__(inner.shape, inner.compute_dtype)
        self.inner = inner
        self.dynamic_act = inner.dynamic_act
        self.shift = 0
        self.calibrating = False
        self.amax_in = 0.0
        self.amax_out = 0.0

    @classmethod
    def cannot_run(
        cls,
        spec: QuantSpec | None,
        kind: LayerKind,
        device: torch.device,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> str | None:
        return "installed around another kernel by the fp16 policy, never chosen by the table"

    def load(self, weight: QuantWeight | Tensor) -> None:
        raise TypeError("fp16_range_guard wraps a loaded kernel; it loads nothing itself")

    def _run(self, x: Tensor, bias: Tensor | None, shift: int) -> Tensor:
        if shift:
            x = x.float() * 2.0**-shift
        y = self.inner(x.to(self.compute_dtype)).float()
        if shift:
            y = y * 2.0**shift
        return y if bias is None else y + bias.float()

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.calibrating:
            return self._calibrate(x, bias)
        return self._run(x, bias, self.shift)

    def _calibrate(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """Raise the shift until input and output fit with headroom (or give up at _MAX_SHIFT)."""
        amax_in = float(x.float().abs().amax()) if x.numel() else 0.0
        shift = max(self.shift, needed_shift(amax_in))
        while True:
            y = self._run(x, None, shift)
            amax_out = float(y.abs().amax()) if y.numel() else 0.0
            fits = math.isfinite(amax_out) and amax_out * 2.0**-shift <= _LIMIT
            if fits or shift >= _MAX_SHIFT:
                break
            # A finite output says how far to go; an overflowed one only that it was too far.
            shift = min(
                _MAX_SHIFT, max(shift + 8, needed_shift(amax_out)) if math.isfinite(amax_out) else shift + 8
            )
        self.shift = shift
        self.amax_in, self.amax_out = max(self.amax_in, amax_in), max(self.amax_out, amax_out)
        return y if bias is None else y + bias.float()

    def extra_repr(self) -> str:
        return f"shift={self.shift}, inner={self.inner.name}"


@dataclass
class Fp16Report:
    """What the warm-up found: each guarded layer's shift and largest values (kept layers only)."""

    shifts: dict[str, int] = field(default_factory=dict)
    amax: dict[str, tuple[float, float]] = field(default_factory=dict)  # prefix -> (input, output)
    checked_tokens: int = 0


def guarded_layers(model: CausalLM) -> list[tuple[QuantLinear, GatedMLP | None]]:
    """The layers whose outputs only meet fp32: MLP projections and attention output projections
    (on one device; a tensor-parallel layer sums fp16 partial outputs over ranks)."""
    found: list[tuple[QuantLinear, GatedMLP | None]] = []
    for module in model.modules():
        if isinstance(module, GatedMLP) and module.gate_proj.kind == "linear":
            ups = (
                [module.gate_up_proj]
                if module.gate_up_proj is not None
                else [module.gate_proj, module.up_proj]
            )
            found += [(layer, module) for layer in (*ups, module.down_proj)]
        elif isinstance(module, Attention):
            found.append((module.o_proj, None))
    return [(layer, mlp) for layer, mlp in found if layer.kernel is not None and layer.parallel is None]


def guard_fp16(
    model: CausalLM,
    calibration_ids: Sequence[int],
    device: torch.device,
    static_act_prefixes: frozenset[str] = frozenset(),
    debug: bool = False,
) -> Fp16Report:
    """Install range guards, calibrate them on `calibration_ids`, keep those that shift, and fail
    with the first module that still overflows. `static_act_prefixes`: layers with static
    activation scales, never guarded (scaling their input would change their quantization)."""
    guards: list[tuple[QuantLinear, GatedMLP | None, RangeGuardKernel]] = []
    candidates = guarded_layers(model)
    # An MLP is guarded whole or not at all: a guarded gate/up returns fp32, which only a guarded
    # down projection takes.
    static_mlps = {
        id(mlp) for layer, mlp in candidates if mlp is not None and layer.prefix in static_act_prefixes
    }
    for layer, mlp in candidates:
        if layer.prefix in static_act_prefixes or id(mlp) in static_mlps or layer.kernel is None:
            continue
        guard = RangeGuardKernel(layer.kernel)
        guard.calibrating = True
        layer.set_kernel(guard)
        if mlp is not None:
            mlp.hidden_dtype = torch.float32
        guards.append((layer, mlp, guard))
    seq = SequenceCache(model, len(calibration_ids), torch.float16, device)

    def replay() -> None:
        seq.forward(list(calibration_ids), 0)

    try:
        first_bad = first_nonfinite_module(model, replay)
    finally:
        for _, _, guard in guards:
            guard.calibrating = False
    report = Fp16Report(checked_tokens=len(calibration_ids))
    # An MLP with any shifted projection forms its product in fp32 (a shifted gate/up returns
    # fp32), so its down projection keeps a guard even at shift 0: the guard is what casts that
    # fp32 input to the compute dtype.
    kept = {id(guard) for _, _, guard in guards if guard.shift > 0}
    fp32_mlps = {id(mlp) for _, mlp, guard in guards if mlp is not None and id(guard) in kept}
    for layer, mlp, guard in guards:
        if mlp is not None and id(mlp) in fp32_mlps and layer is mlp.down_proj:
            kept.add(id(guard))
    for layer, mlp, guard in guards:
        if mlp is not None and id(mlp) not in fp32_mlps:
            mlp.hidden_dtype = None
        if id(guard) not in kept:
            layer.set_kernel(guard.inner)  # fits as it is: plain fp16 output
        elif guard.shift:
            report.shifts[layer.prefix] = guard.shift
            report.amax[layer.prefix] = (guard.amax_in, guard.amax_out)
    for prefix, shift in report.shifts.items():
        amax_in, amax_out = report.amax[prefix]
        log.info(
            "%s: fp16 range guard, inputs scaled by 2^-%d (largest input %.4g, output %.4g at warm-up)",
            prefix, shift, amax_in, amax_out,
        )  # fmt: skip
    if debug:
        for layer, _, guard in guards:
            log.info(
                "%s: largest |input| %.4g, |output| %.4g at warm-up (fp16 limit %.0f)",
                layer.prefix, guard.amax_in, guard.amax_out, FP16_MAX,
            )  # fmt: skip
    if first_bad is not None:
        raise NumericsError(
            f"{first_bad} overflowed float16 at warm-up ({len(calibration_ids)} tokens): this model's "
            "activations exceed 65504 where the fp16 policy cannot rescale them (attention, keys and "
            "values, fused experts). Run it with dtype float32 (or bfloat16 on a GPU of compute "
            "capability 8.0 or newer)"
        )
    return report


def calibration_ids(config: dict[str, object], vocab_size: int, count: int = 32) -> list[int]:
    """A fixed warm-up prompt without a tokenizer: BOS (where massive activations usually show
    first) followed by ids spread over the vocabulary."""
    bos = config.get("bos_token_id")
    ids = [int(bos)] if isinstance(bos, int) and 0 <= bos < vocab_size else []
    step = max(1, vocab_size // count)
    ids += [(7 + i * step) % vocab_size for i in range(count - len(ids))]
    return ids


def warm_up_fp16(loaded: LoadedModel, debug: bool = False) -> Fp16Report:
    """The fp16 policy's warm-up for a model loaded on one device."""
    static = frozenset(
        p.prefix
        for p in loaded.plans
        if p.spec is not None and p.spec.act is not None and not p.spec.act.dynamic
    )
    vocab = int(loaded.config.get("vocab_size", 0))
    ids = calibration_ids(loaded.config, vocab)
    return guard_fp16(loaded.model, ids, loaded.device, static, debug)
