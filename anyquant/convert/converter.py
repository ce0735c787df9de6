"""`anyquant convert`: rewrite a quantized checkpoint in another format, one layer at a time.

Owns the streaming driver. Every quantized layer goes source reader -> canonical `QuantWeight`
-> (optional intermediate-dimension permutation and zero padding) -> an exact translation into
the target writer's spec, checked by dequantizing both sides -> the writer's `encode`. A layer the
target cannot hold exactly is refused with its reason (nothing is written), or re-quantized from
its dequantized values with `--requantize`, which reports the error introduced. Layers the source
stores unquantized stay unquantized; every other tensor is copied.

Two passes over the layers: the first decodes each layer only to learn its simplest spec (a GPTQ
symmetric layer that AWQ stored with explicit zeros is symmetric again) and whether its scales fit
a dtype, so the target writer is configured for what the layers really are; the second converts.
Only one layer is held at a time. Targets are the registered `FormatWriter`s: a new output format
plugs in by registering a writer (and `options_for` where its options need more than the generic
mapping); nothing here names a format.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.convert.exact import dequantized_equal, drop_trivial_act_order, fit_exact, minimal
from anyquant.convert.gguf_source import write_gguf_side_files
from anyquant.convert.padding import (
    DEFAULT_TILE,
    PaddingPlan,
    pad_bias,
    pad_weight,
    padded_config,
    plan_padding,
)
from anyquant.convert.quantize import (
    ShardWriter,
    require_save_modules,
    write_configs,
)
from anyquant.convert.reorder import (
    down_first,
    mlp_producers,
    permute_inputs,
    permute_outputs,
    sorting_permutation,
)
from anyquant.errors import AnyquantError, UnsupportedError
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.loader import build_on_meta, resolve_dtype
from anyquant.loading.plan import LayerPlan, plan_layers
from anyquant.loading.preflight import spec_lookup
from anyquant.loading.progress import LoadProgress
from anyquant.loading.sources import open_checkpoint
from anyquant.loading.validate import check_linear
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.detect import detect_format
from anyquant.quant.formats.base import FormatWriter, QuantFormat, WriteOptions
from anyquant.quant.quant_error import relative_error
from anyquant.quant.reference import dequantize
from anyquant.quant.registry import writer_class
from anyquant.quant.spec import QuantSpec
from anyquant.quant.weight import QuantWeight
from anyquant.utils.memory import return_freed_memory

log = logging.getLogger(__name__)

# Present while a conversion is under way: a directory holding it was left by an interrupted or
# refused run and is never mistaken for a finished checkpoint (config.json is written last).
PARTIAL_MARKER = ".anyquant-convert-incomplete"
_MAPPED_BYTES = 128 << 20  # drop the input's memory maps this often (as quantize does)
# Scale dtypes tried, after the model's own, for formats that store scales in a float dtype of
# their choice: the first that holds every layer's scales exactly wins.
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class ConvertOptions:
    requantize: bool = False  # re-quantize (and report the error of) layers that cannot be exact
    allow_reorder: bool = False  # permute MLP intermediate dimensions to drop act-order
    pad_for_tp: int = 1  # pad intermediate sizes for this tensor-parallel size (1: no padding)
    tile: int = DEFAULT_TILE
    overwrite: bool = False


@dataclass
class LayerOutcome:
    prefix: str
    source: str  # the source spec, or "unquantized"
    target: str  # the written spec, or "unquantized"
    how: str  # exact | reordered | dequantized (lossless, float32) | requantized | unquantized | refused
    rel_error: float | None = None  # requantized layers: ||deq(src) - deq(dst)|| / ||deq(src)||
    reason: str | None = None


@dataclass
class ConvertReport:
    target: str
    layers: list[LayerOutcome] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    padding: list[str] = field(default_factory=list)
    scale_dtype: str = ""


class ConversionRefused(AnyquantError):
    """Some layers cannot be written exactly; nothing was kept."""

    def __init__(self, target: str, refused: list[LayerOutcome]) -> None:
        self.refused = refused
        lines = "\n".join(f"  {r.prefix}: {r.reason}" for r in refused)
        super().__init__(
            f"{len(refused)} layer(s) cannot be converted to {target} exactly (nothing was written):\n{lines}\n"
            "pass --requantize to re-quantize them (lossy; the error of each layer is reported)"
        )


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    target: str,
    options: ConvertOptions | None = None,
    progress: LoadProgress | None = None,
) -> ConvertReport:
    options = options or ConvertOptions()
    require_save_modules()
    src_path, dst_path = Path(src), Path(dst)
    writer_cls = writer_class(target)
    ckpt = open_checkpoint(src_path)  # a model directory, or a GGUF file read as one
    source = detect_format(ckpt)
    if source is None:
        raise AnyquantError(f"{src_path} is not quantized; `anyquant quantize` writes a first quantized copy")
    if dst_path.resolve() == src_path.resolve():
        raise AnyquantError(f"{dst_path}: the output directory must differ from the input")
    _check_output(dst_path, options.overwrite)
    config = ckpt.text_config()
    model_dtype = resolve_dtype("auto", config, torch.device("cpu"))
    model = build_on_meta(config, ckpt.index.names())
    plans = plan_layers(ckpt, source, model, torch.device("cpu"), torch.float32, prefer_kernel="reference")
    padding = (
        plan_padding(model, spec_lookup(source), ckpt.config, options.pad_for_tp, options.tile)
        if options.pad_for_tp > 1
        else None
    )
    producers = mlp_producers(model)
    progress = progress or LoadProgress(str(src_path))
    total = sum(ckpt.index.info(n).numel * ckpt.index.info(n).torch_dtype.itemsize for n in ckpt.index)

    progress.start_weights(total, desc="surveying layers")
    surveyed = _survey(ckpt, source, plans, progress)
    progress.finish_weights()
    ckpt.close()  # the survey's last maps would otherwise stay resident through the next pass
    dominant = Counter(spec for _, spec, _ in surveyed).most_common(1)[0][0]
    # A quantized LM head goes to the target quantized when it has the other layers' spec; one of
    # its own type (GGUF files keep it at Q6_K) is left to the target's default, which writes it
    # unquantized (dequantized losslessly) rather than refusing the whole model over it.
    lm_head = any(kind == "lm_head" and spec == dominant for kind, spec, _ in surveyed)
    writer = _make_writer(writer_cls, dominant, lm_head, [spec for _, spec, _ in surveyed])
    exact_dtypes = set(_SCALE_DTYPES)
    for kind, _spec, exact in surveyed:
        if kind != "lm_head" or lm_head:
            exact_dtypes &= exact
    scale_dtype = _choose_scale_dtype(writer, model_dtype, exact_dtypes)
    report = ConvertReport(target, scale_dtype=str(scale_dtype).removeprefix("torch."))
    if padding is not None:
        report.padding = padding.describe()

    _prepare_output(dst_path, options.overwrite)
    job = _Job(ckpt, source, writer, scale_dtype, model_dtype, options, padding, producers, report, dst_path)
    progress.start_weights(total, desc=f"converting to {target}")
    try:
        job.run(down_first(plans, producers), progress)
    finally:
        progress.finish_weights()
        ckpt.close()
    refused = [r for r in report.layers if r.how == "refused"]
    if refused:
        shutil.rmtree(dst_path)
        raise ConversionRefused(target, refused)
    report.files = job.out.finish()
    new_config = padded_config(ckpt.config, padding) if padding is not None else ckpt.config
    write_configs(ckpt, dst_path, writer, job.skipped, config=_without_nested_quant_config(new_config))
    write_gguf_side_files(ckpt, dst_path)
    (dst_path / PARTIAL_MARKER).unlink()
    log.info("converted %s -> %s (%s)", src_path, dst_path, target)
    return report


def _without_nested_quant_config(config: dict[str, Any]) -> dict[str, Any]:
    """The source's quantization_config nested in a multimodal text config would contradict the
    new top-level one (readers look there too): drop it."""
    out = dict(config)
    for key, sub in config.items():
        if isinstance(sub, dict) and "quantization_config" in sub:
            out[key] = {k: v for k, v in sub.items() if k != "quantization_config"}
    return out


def checkpoint_padding(src: str | Path, world: int, tile: int = DEFAULT_TILE) -> PaddingPlan:
    """What `--pad-for-tp world` would do to `src`, from its headers and config.json only."""
    ckpt = open_checkpoint(src)
    model = build_on_meta(ckpt.text_config(), ckpt.index.names())
    return plan_padding(model, spec_lookup(detect_format(ckpt)), ckpt.config, world, tile)


# -- output directory --------------------------------------------------------------------------


def _check_output(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise AnyquantError(f"{dst} exists and is not a directory")
    if not dst.exists() or not any(dst.iterdir()) or overwrite:
        return
    if (dst / PARTIAL_MARKER).exists() or any(dst.glob(".shard-*.tmp")):
        raise AnyquantError(
            f"{dst} holds an unfinished conversion (an interrupted run; it has no config.json yet). "
            "Conversions do not resume: delete the directory, or pass --overwrite to start again"
        )
    raise AnyquantError(
        f"{dst} exists and is not empty; choose a new directory or pass --overwrite to replace it"
    )


def _prepare_output(dst: Path, overwrite: bool) -> None:
    if dst.exists() and any(dst.iterdir()) and overwrite:
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / PARTIAL_MARKER).write_text("anyquant convert is writing this directory\n")


# -- survey: what the layers really are ------------------------------------------------------


def decode_layer(ckpt: Checkpoint, source: QuantFormat, plan: LayerPlan, read: list[str]) -> QuantWeight:
    assert plan.spec is not None
    stored = ckpt.read_many(n for n in read if n != plan.bias)
    weight = source.decode(plan.prefix, plan.spec, stored).validate(plan.prefix)
    return minimal(drop_trivial_act_order(weight))


def _survey(
    ckpt: Checkpoint, source: QuantFormat, plans: list[LayerPlan], progress: LoadProgress
) -> list[tuple[str, QuantSpec, set[torch.dtype]]]:
    """Each quantized layer's kind, simplest spec and the float dtypes that hold its scales exactly."""
    specs: list[tuple[str, QuantSpec, set[torch.dtype]]] = []
    mapped = 0
    for plan in plans:
        read = check_linear(ckpt, source, plan)
        nbytes = _stored_bytes(ckpt, read)
        if plan.spec is not None:
            weight = decode_layer(ckpt, source, plan, read)
            exact = {d for d in _SCALE_DTYPES if bool((weight.scale.to(d).float() == weight.scale).all())}
            specs.append((plan.kind, weight.spec, exact))
            del weight
        mapped += nbytes
        if mapped > _MAPPED_BYTES:
            ckpt.close()
            mapped = 0
        progress.advance(nbytes)
    if not specs:
        raise AnyquantError(f"{ckpt.path}: no quantized layer found to convert")
    return specs


def _make_writer(
    writer_cls: type[FormatWriter], dominant: QuantSpec, lm_head: bool, specs: list[QuantSpec]
) -> FormatWriter:
    """The target writer configured for the most common layer spec (other layers fit or not);
    `lm_head`: the source quantizes its LM head, so writers that skip it by default are asked not to."""
    options = writer_cls.options_for(dominant)
    if lm_head:
        options = replace(options, extra={**options.extra, "lm_head": True})
    candidates = [options]
    if not options.act_order and any(s.act_order for s in specs):
        # A format with act-order stores plain groups too (a trivial index), so some act-order
        # layers are enough to ask for it; a format without it refuses them (or reorders).
        candidates.insert(0, replace(options, act_order=True))
    first: UnsupportedError | None = None
    for candidate in (*candidates, WriteOptions()):  # defaults last: each layer then says why
        try:
            return writer_cls(candidate)
        except UnsupportedError as exc:
            first = first or exc
    assert first is not None
    raise first


def _choose_scale_dtype(
    writer: FormatWriter, model_dtype: torch.dtype, exact: set[torch.dtype]
) -> torch.dtype:
    for dtype in (model_dtype, *_SCALE_DTYPES):
        if dtype in exact and writer.scale_dtype(dtype) == dtype:
            return dtype
    return writer.scale_dtype(model_dtype)  # the format's fixed choice; layers it cannot hold are refused


def _stored_bytes(ckpt: Checkpoint, names: list[str]) -> int:
    return sum(ckpt.index.info(n).numel * ckpt.index.info(n).torch_dtype.itemsize for n in names)


# -- the conversion pass -----------------------------------------------------------------------


class _Job:
    def __init__(
        self,
        ckpt: Checkpoint,
        source: QuantFormat,
        writer: FormatWriter,
        scale_dtype: torch.dtype,
        model_dtype: torch.dtype,
        options: ConvertOptions,
        padding: PaddingPlan | None,
        producers: dict[str, tuple[str, ...]],
        report: ConvertReport,
        dst: Path,
    ) -> None:
        self.ckpt, self.source, self.writer = ckpt, source, writer
        self.scale_dtype, self.model_dtype = scale_dtype, model_dtype
        self.options, self.padding, self.producers, self.report = options, padding, producers, report
        self.out = ShardWriter(dst)
        self.skipped: list[str] = []
        self.perms: dict[str, Tensor] = {}  # gate/up prefix -> the row permutation of its down
        self.quantized: set[str] = set()
        self.consumed: set[str] = set()
        self.refusing = False  # after a refusal, layers are still checked but nothing is written

    def run(self, plans: list[LayerPlan], progress: LoadProgress) -> None:
        mapped = 0
        for plan in plans:
            read = check_linear(self.ckpt, self.source, plan)
            self.consumed.update(read)
            if plan.spec is None:
                self._dense(plan)
            else:
                self.quantized.add(plan.prefix)
                self._quantized(plan, read)
            nbytes = _stored_bytes(self.ckpt, read)
            mapped += nbytes
            if mapped > _MAPPED_BYTES:
                self.ckpt.close()  # nothing kept is a view into the maps
                mapped = 0
            progress.advance(nbytes)
            return_freed_memory()
        for name in self.ckpt.index:
            if name in self.consumed or any(name.startswith(f"{p}.") for p in self._owner_prefixes(name)):
                continue
            if not self.refusing:
                self.out.add(name, self.ckpt.read(name).clone())
            progress.advance(_stored_bytes(self.ckpt, [name]))

    def _owner_prefixes(self, name: str) -> list[str]:
        """Quantized layers that `name` would belong to (leftover source-format tensors of a
        converted layer, e.g. an unused activation scale, must not reach the target)."""
        parts = name.split(".")
        return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in self.quantized]

    def _add(self, name: str, tensor: Tensor) -> None:
        if not self.refusing:
            self.out.add(name, tensor)

    def _refuse(self, outcome: LayerOutcome) -> None:
        self.refusing = True
        self.report.layers.append(outcome)

    def _dense(self, plan: LayerPlan) -> None:
        prefix = plan.prefix
        shape = self.padding.padded_shape(prefix, plan.shape) if self.padding else plan.shape
        if plan.kind != "lm_head":
            # As `quantize` lists them: every unquantized layer but an LM head (which formats
            # leave unquantized by default) goes to the target's skip list; asking the writer
            # first lets it note the layers it never quantizes anyway.
            self.writer.spec_for(prefix, shape, plan.kind)
            self.skipped.append(prefix)
        name = plan.stored.required[0]
        if name != f"{prefix}.weight":  # tied to another tensor, which is copied as it is
            self.report.layers.append(
                LayerOutcome(prefix, "unquantized", "unquantized (tied)", "unquantized")
            )
            return
        weight = self.ckpt.read(name)
        if prefix in self.perms:
            weight = weight.index_select(0, self.perms[prefix])  # a dense gate/up of a reordered MLP
        if self.padding is not None:
            padded = pad_weight(weight, prefix, self.padding)
            assert isinstance(padded, Tensor)
            weight = padded
        self._add(name, weight.clone())
        self._bias(plan)
        self.report.layers.append(LayerOutcome(prefix, "unquantized", "unquantized", "unquantized"))

    def _bias(self, plan: LayerPlan) -> None:
        if plan.bias is None:
            return
        bias = self.ckpt.read(plan.bias)
        if plan.prefix in self.perms:
            bias = bias.index_select(0, self.perms[plan.prefix])
        if self.padding is not None:
            bias = pad_bias(bias, plan.prefix, self.padding)
        self._add(f"{plan.prefix}.bias", bias.clone())

    def _quantized(self, plan: LayerPlan, read: list[str]) -> None:
        prefix, target = plan.prefix, self.report.target
        weight = decode_layer(self.ckpt, self.source, plan, read)
        source_desc = weight.spec.describe()
        shape = self.padding.padded_shape(prefix, plan.shape) if self.padding else plan.shape
        tspec = self.writer.spec_for(prefix, shape, plan.kind)
        how = "exact"
        # 1. The intermediate dimension's permutation: a down projection sets it, gate/up follow.
        if prefix in self.perms:
            permuted = permute_outputs(weight, self.perms[prefix], prefix)
            if isinstance(permuted, str):
                self._refuse(LayerOutcome(prefix, source_desc, target, "refused", reason=permuted))
                return
            assert isinstance(permuted, QuantWeight)
            weight, how = permuted, "reordered"
        reason: str | None = None
        if weight.spec.act_order and isinstance(tspec, QuantSpec) and not tspec.act_order:
            reordered = self._reorder(prefix, weight)
            if isinstance(reordered, str):
                reason = reordered
            else:
                weight, how = reordered, "reordered"
        # 2. Zero padding for tensor parallelism (exact by construction).
        if self.padding is not None:
            padded = pad_weight(weight, prefix, self.padding)
            assert isinstance(padded, QuantWeight)
            weight = padded
        # 3. The exact translation, verified.
        converted: QuantWeight | None = None
        if reason is None:
            if isinstance(tspec, str):
                reason = f"{target} does not store this layer: {tspec}"
            else:
                fitted = fit_exact(weight, tspec, self.scale_dtype)
                if isinstance(fitted, str):
                    reason = f"{target} cannot hold it exactly: {fitted}"
                elif not dequantized_equal(weight, fitted):
                    raise AnyquantError(f"{prefix}: the exact translation changed dequantized values (a bug)")
                else:
                    converted = fitted
        if converted is None and plan.kind == "lm_head":
            # An LM head of its own type (GGUF files keep it at Q6_K) that the target does not
            # quantize or cannot hold exactly: float32 holds its dequantized values exactly, so it
            # is written unquantized rather than refusing the whole model over it.
            self._add(f"{prefix}.weight", dequantize(weight, torch.float32))
            self.skipped.append(prefix)
            self.report.layers.append(
                LayerOutcome(prefix, source_desc, "unquantized (float32)", "dequantized", reason=reason)
            )
        elif converted is not None:
            self._write(prefix, converted)
            self.report.layers.append(LayerOutcome(prefix, source_desc, converted.spec.describe(), how))
        elif not self.options.requantize:
            self._refuse(LayerOutcome(prefix, source_desc, target, "refused", reason=reason))
            return
        else:
            self._requantize(plan, weight, tspec, source_desc, reason or "")
        self._bias(plan)

    def _reorder(self, prefix: str, weight: QuantWeight) -> QuantWeight | str:
        target = self.report.target
        base = f"{target} has no act-order: layer {prefix} has a non-trivial g_idx"
        gates = self.producers.get(prefix)
        if gates is None:
            return (
                f"{base}; its input is the hidden state every layer shares, so no exact permutation "
                "exists (only a down projection's input, the MLP intermediate dimension, can be permuted)"
            )
        if not self.options.allow_reorder:
            return f"{base}; use --allow-reorder to permute the input dimension"
        perm = sorting_permutation(weight)
        if isinstance(perm, str):
            return f"{base}; it cannot be sorted into plain groups: {perm}"
        for gate in gates:
            self.perms[gate] = perm
        return permute_inputs(weight, perm)

    def _write(self, prefix: str, weight: QuantWeight) -> None:
        for name, tensor in self.writer.encode(prefix, weight).items():
            self._add(name, tensor)

    def _requantize(
        self, plan: LayerPlan, weight: QuantWeight, tspec: QuantSpec | str, source_desc: str, reason: str
    ) -> None:
        prefix = plan.prefix
        dense = dequantize(weight, torch.float32)
        if isinstance(tspec, str):
            stored = dense.to(self.model_dtype)
            self._add(f"{prefix}.weight", stored)
            self.skipped.append(prefix)
            err = _dense_error(dense, stored)
            outcome = LayerOutcome(prefix, source_desc, "unquantized", "requantized", err, reason)
        else:
            new = quantize_rtn(dense, tspec, self.scale_dtype)
            act = tspec.act
            if act is not None and not act.dynamic:
                src_act = weight.spec.act
                if (
                    src_act is None
                    or src_act.dynamic
                    or src_act.type != act.type
                    or weight.input_scale is None
                ):
                    self._refuse(
                        LayerOutcome(prefix, source_desc, self.report.target, "refused",
                                     reason=f"{reason}; the target's static activation scale needs calibration data")
                    )  # fmt: skip
                    return
                new.input_scale, new.input_zero = weight.input_scale, weight.input_zero
            new.validate(prefix)
            self._write(prefix, new)
            err = relative_error(dense, new)
            outcome = LayerOutcome(prefix, source_desc, tspec.describe(), "requantized", err, reason)
        self.report.layers.append(outcome)


def _dense_error(reference: Tensor, stored: Tensor) -> float:
    ref = reference.double()
    return float((stored.double() - ref).norm() / ref.norm().clamp(min=1e-60))
