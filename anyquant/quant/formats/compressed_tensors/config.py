"""compressed-tensors `quantization_config`: parsing, validation and the canonical spec of a group.

Owns the config semantics (formats.md §4): config groups, quantization args, per-group formats,
status and rejected variants, and the mapping of a group's args to a canonical `QuantSpec`.
Reads no tensors; the reader (reader.py) and the writer (writer.py) share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from anyquant.errors import QuantConfigError
from anyquant.quant.spec import ActQuant, ActType, Granularity, QuantSpec, WeightType
from anyquant.quant.weight_types import canonical_uint

_QUANT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
_DENSE_FORMATS = ("dense", "fakequant")  # "fakequant" is the library's default for unsaved configs
_REJECTED_FORMATS = {
    "marlin-24": "2:4-sparse Marlin layout",
    "sparse-bitmask": "bitmask sparsity",
    "sparse-24-bitmask": "2:4 bitmask sparsity",
    "nvfp4-pack-quantized": "NVFP4 (fp4 weights with fp8 group scales)",
    "mxfp4-pack-quantized": "MXFP4 microscaling",
    "mxfp6-pack-quantized": "MXFP6 microscaling",
    "mxfp8-quantized": "MXFP8 microscaling",
}
_STATUSES = ("initialized", "calibration", "frozen", "compressed", "decompressed")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class QuantArgs:
    """One `weights` / `input_activations` entry of a config group, validated."""

    num_bits: int
    type: str  # "int" | "float"
    symmetric: bool
    strategy: str  # tensor | channel | group | block | token
    group_size: int  # 0 unless strategy == "group"
    block: tuple[int, int]  # (rows, cols), only for strategy == "block"
    dynamic: bool
    actorder: str | None  # "group" (real g_idx) | "weight" (calibration only) | None


@dataclass(frozen=True)
class ConfigGroup:
    name: str
    targets: tuple[str, ...]
    format: str | None  # per-group storage format, None: use the top-level one
    weights: QuantArgs | None
    acts: QuantArgs | None


def _fail(where: str, value: Any, why: str) -> QuantConfigError:
    return QuantConfigError(f"quantization_config.{where} = {value!r}: {why}")


def _int(raw: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{where}.{key}", value, "expected an integer")
    return value


def _block(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, str):  # very old files write "128x128"
        parts = value.lower().split("x")
        value = [int(p) for p in parts] if all(p.isdigit() for p in parts) else None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise _fail(f"{where}.block_structure", value, "expected [rows, cols] of positive integers")
    return int(value[0]), int(value[1])


def _strategy(raw: dict[str, Any], group_size: int | None, where: str) -> str:
    strategy = raw.get("strategy")
    if strategy is None:  # older files: inferred from group_size as the library does
        return "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    if not isinstance(strategy, str):
        raise _fail(f"{where}.strategy", strategy, "expected a string")
    return strategy.lower()


def _actorder(value: Any, where: str) -> str | None:
    if value is None or value is False:
        return None
    if value is True:  # old files: true meant "group"
        return "group"
    aliases = {"static": "weight", "dynamic": "group", "weight": "weight", "group": "group"}
    if not isinstance(value, str) or value.lower() not in aliases:
        raise _fail(f"{where}.actorder", value, "expected null, 'weight'/'static' or 'group'/'dynamic'")
    return aliases[value.lower()]


def parse_args(raw: Any, where: str) -> QuantArgs | None:
    """Validate one QuantizationArgs object; `where` names it for messages."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(where, raw, "expected an object or null")
    num_bits = _int(raw, "num_bits", where, 8) or 0
    qtype = str(raw.get("type", "int")).lower()
    if qtype not in ("int", "float"):
        raise _fail(f"{where}.type", raw.get("type"), "expected 'int' or 'float'")
    symmetric = raw.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise _fail(f"{where}.symmetric", symmetric, "expected true or false")
    group_size = _int(raw, "group_size", where, None)
    strategy = _strategy(raw, group_size, where)
    if strategy == "group" and (group_size is None or group_size <= 0):
        raise _fail(f"{where}.group_size", group_size, "strategy 'group' needs a positive group_size")
    block = (0, 0)
    if strategy == "block":
        block = _block(raw.get("block_structure"), where)
    dynamic = raw.get("dynamic", False)
    if isinstance(dynamic, str):
        raise _fail(f"{where}.dynamic", dynamic, "locally dynamic (tensor_group / NVFP4) is not supported")
    if not isinstance(dynamic, bool):
        raise _fail(f"{where}.dynamic", dynamic, "expected true or false")
    return QuantArgs(
        num_bits=num_bits,
        type=qtype,
        symmetric=symmetric,
        strategy=strategy,
        group_size=(group_size or 0) if strategy == "group" else 0,
        block=block,
        dynamic=dynamic,
        actorder=_actorder(raw.get("actorder"), where),
    )


def _check_weights(w: QuantArgs, where: str) -> None:
    if w.dynamic:
        raise _fail(f"{where}.dynamic", True, "dynamic weight quantization does not exist on disk")
    if w.type == "float" and w.num_bits != 8:
        raise _fail(
            f"{where}.num_bits", w.num_bits, "float weights other than fp8 (fp4/fp6) are not supported"
        )
    if w.type == "float" and not w.symmetric:
        raise _fail(f"{where}.symmetric", False, "asymmetric fp8 weights are not supported")
    if w.type == "int" and not 1 <= w.num_bits <= 8:
        raise _fail(f"{where}.num_bits", w.num_bits, "integer weights of 1..8 bits are supported")
    if w.strategy not in ("tensor", "channel", "group", "block"):
        raise _fail(f"{where}.strategy", w.strategy, "expected tensor, channel, group or block for weights")
    if w.strategy == "group" and w.group_size % 8:
        raise _fail(f"{where}.group_size", w.group_size, "anyquant needs group sizes that are multiples of 8")
    if w.strategy == "block" and w.type != "float":
        raise _fail(f"{where}.strategy", "block", "block scales are supported for fp8 weights only")


def _check_acts(a: QuantArgs, where: str) -> None:
    if a.num_bits != 8:
        raise _fail(f"{where}.num_bits", a.num_bits, "only 8-bit (int8 / fp8) activations are supported")
    if a.dynamic and a.strategy not in ("token", "group", "tensor"):
        raise _fail(f"{where}.strategy", a.strategy, "dynamic activations need token, group or tensor")
    if not a.dynamic and a.strategy != "tensor":
        raise _fail(f"{where}.strategy", a.strategy, "static activations are supported per tensor only")
    if not a.symmetric and (a.dynamic or a.type == "float"):
        raise _fail(f"{where}.symmetric", False, "asymmetric activations need static int8")
    if a.actorder is not None:
        raise _fail(f"{where}.actorder", a.actorder, "activation ordering applies to weights only")


def _check_format(value: Any, where: str, allow_mixed: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(where, value, "expected a string")
    fmt = value.lower()
    if fmt in _REJECTED_FORMATS or fmt.startswith("mxfp"):
        why = _REJECTED_FORMATS.get(fmt, "microscaling formats")
        raise _fail(where, value, f"{why} is not supported by anyquant")
    known = (*_QUANT_FORMATS, *_DENSE_FORMATS, *(("mixed-precision",) if allow_mixed else ()))
    if fmt not in known:
        raise _fail(where, value, f"unknown format; anyquant reads {', '.join(known)}")
    return fmt


def _is_empty(value: Any) -> bool:
    """Empty sparsity/transform configs come as null, {} or objects whose members are all empty."""
    if not value:
        return True
    return isinstance(value, dict) and all(not v for v in value.values())


def _preset_group(name: str, targets: Any) -> dict[str, Any]:
    """A config group written as a preset reference, e.g. {"W4A16": ["Linear"]}."""
    preset = PRESETS.get(name.upper())
    if preset is None:
        raise _fail(f"config_groups.{name}", targets, f"unknown preset; known: {', '.join(sorted(PRESETS))}")
    return {"targets": targets, "weights": preset.weights, "input_activations": preset.acts}


def parse_group(name: str, raw: Any) -> ConfigGroup:
    where = f"config_groups.{name}"
    if isinstance(raw, list):
        raw = _preset_group(name, raw)
    if not isinstance(raw, dict):
        raise _fail(where, raw, "expected a scheme object")
    targets = raw.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise _fail(f"{where}.targets", targets, "expected a non-empty list of strings")
    weights = parse_args(raw.get("weights"), f"{where}.weights")
    acts = parse_args(raw.get("input_activations"), f"{where}.input_activations")
    if raw.get("output_activations") is not None:
        raise _fail(
            f"{where}.output_activations", raw["output_activations"], "output quantization is not supported"
        )
    if weights is not None:
        _check_weights(weights, f"{where}.weights")
    if acts is not None:
        _check_acts(acts, f"{where}.input_activations")
        if weights is None:
            raise _fail(f"{where}.weights", None, "activation-only quantization is not supported")
    fmt = _check_format(raw.get("format"), f"{where}.format", allow_mixed=False)
    return ConfigGroup(name, tuple(targets), fmt, weights, acts)


def _parse_version(value: Any) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", value) if isinstance(value, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _compile_target(target: str, where: str) -> re.Pattern[str] | None:
    if not target.startswith("re:"):
        return None
    try:
        return re.compile(target[3:])
    except re.error as exc:
        raise _fail(where, target, f"invalid regular expression: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Mapping config groups to canonical specs


def _granularity(w: QuantArgs, layout: str) -> tuple[Granularity, int, tuple[int, int]]:
    """(granularity, group_size, block_shape) of the canonical spec for these weight args."""
    if w.strategy == "group":
        if layout == "fp8":  # one fp8 scale per row and G columns is a 1 x G block
            return "block", 0, (1, w.group_size)
        return "group", w.group_size, (0, 0)
    if w.strategy == "block":
        return "block", 0, w.block
    if w.strategy == "tensor" and layout != "packed":
        return "tensor", 0, (0, 0)
    # channel; or tensor for uintN, which is per channel or group: the one scale repeats per row
    return "channel", 0, (0, 0)


def act_quant(a: QuantArgs | None) -> ActQuant | None:
    if a is None:
        return None
    kind: ActType = "int8" if a.type == "int" else "fp8_e4m3"
    if a.dynamic:
        # compressed-tensors' reference scales int8 by amax / ((127 - -128) / 2) = amax / 127.5.
        divisor = 127.5 if kind == "int8" else None
        if a.strategy == "group":
            return ActQuant(kind, True, "group", a.group_size, scale_divisor=divisor)
        return ActQuant(kind, True, "token" if a.strategy == "token" else "tensor", scale_divisor=divisor)
    return ActQuant(kind, False, "tensor", symmetric=a.symmetric)


def spec_from_args(
    w: QuantArgs,
    a: QuantArgs | None,
    layout: str,
    *,
    has_zero: bool,
    act_order: bool,
    fmt: str,
) -> QuantSpec:
    gran, group_size, block = _granularity(w, layout)
    weight: WeightType
    extra: list[tuple[str, str]] = [("format", fmt)]
    if layout == "packed":
        weight = canonical_uint(w.num_bits)
        if int(weight[4:]) != w.num_bits:
            extra.append(("stored_bits", str(w.num_bits)))
    elif layout == "int8":
        weight = "int8"
        if w.num_bits != 8:
            extra.append(("stored_bits", str(w.num_bits)))
    else:
        weight = "fp8_e4m3"
    return QuantSpec(
        weight=weight,
        granularity=gran,
        group_size=group_size,
        block_shape=block,
        has_zero=has_zero,
        act=act_quant(a),
        act_order=act_order,
        extra=tuple(extra),
    )


# ---------------------------------------------------------------------------------------------
# Presets: llm-compressor schemes by name (a config group may name one; the writer writes them)


@dataclass(frozen=True)
class Preset:
    """An llm-compressor scheme as compressed-tensors 0.20.0 serializes it in config.json."""

    weights: dict[str, Any]
    acts: dict[str, Any] | None


def _int_weights(bits: int, symmetric: bool = True, group_size: int | None = 128) -> dict[str, Any]:
    strategy = "group" if group_size else "channel"
    return {"dynamic": False, "group_size": group_size, "num_bits": bits, "strategy": strategy,
            "symmetric": symmetric, "type": "int"}  # fmt: skip


def _acts(kind: str, strategy: str, dynamic: bool, group_size: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"dynamic": dynamic, "group_size": group_size, "num_bits": 8,
                           "strategy": strategy, "symmetric": True, "type": kind}  # fmt: skip
    if kind == "float" and not dynamic:
        out["observer"] = "static_minmax"  # the FP8 preset sets it explicitly, so it is serialized
    return out


def _fp8_weights(strategy: str) -> dict[str, Any]:
    out: dict[str, Any] = {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": strategy,
                           "symmetric": True, "type": "float"}  # fmt: skip
    if strategy == "block":
        out["block_structure"] = [128, 128]
    return out


# compressed-tensors 0.20.0 `PRESET_SCHEMES` (the subset anyquant writes). Note that W8A16 is
# group-128 in this release (older releases used channel scales).
PRESETS: dict[str, Preset] = {
    "W2A16": Preset(_int_weights(2), None),
    "W3A16": Preset(_int_weights(3), None),
    "W4A16": Preset(_int_weights(4), None),
    "W8A16": Preset(_int_weights(8), None),
    "W4A16_ASYM": Preset(_int_weights(4, symmetric=False), None),
    "W8A8": Preset(_int_weights(8, group_size=None), _acts("int", "token", True)),
    "INT8": Preset(_int_weights(8, group_size=None), _acts("int", "token", True)),
    "FP8": Preset(_fp8_weights("tensor"), _acts("float", "tensor", False)),
    "FP8_DYNAMIC": Preset(_fp8_weights("channel"), _acts("float", "token", True)),
    "FP8_BLOCK": Preset(_fp8_weights("block"), _acts("float", "group", True, 128)),
}
