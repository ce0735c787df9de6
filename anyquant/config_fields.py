"""Typed reads of config.json fields: a wrong type or an impossible value is a `CheckpointError`
naming the field and what was expected, never a bare ValueError/TypeError from `int("x")`.

A field that is absent or null takes its default (transformers' convention); `REQUIRED` marks one
without a default. JSON booleans are not numbers here (`true` is no hidden size), and integral
floats (`32.0`, as some exporters write) are accepted as integers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from anyquant.errors import CheckpointError

REQUIRED: Any = object()


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file whose top level is an object (config.json and its siblings); anything else is a
    CheckpointError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return value


def _bad(key: str, value: Any, expected: str, where: str) -> CheckpointError:
    return CheckpointError(f"{where}: field {key!r} = {value!r:.80}; expected {expected}")


def _get(config: dict[str, Any], key: str, default: Any, where: str) -> Any:
    value = config.get(key)
    if value is None:
        if default is REQUIRED:
            arch = config.get("architectures")
            name = arch[0] if isinstance(arch, list) and arch else "this model"
            raise CheckpointError(f"{where}: field {key!r} is required for {name}")
        return default
    return value


def as_int(value: Any) -> int | None:
    """`value` as an int if it is a JSON integer (or an integral float), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def cfg_int(
    config: dict[str, Any], key: str, default: Any = REQUIRED, *, minimum: int = 1, where: str = "config.json"
) -> int:
    if config.get(key) is None:
        return int(_get(config, key, default, where))
    value = config[key]
    number = as_int(value)
    if number is None or number < minimum:
        raise _bad(key, value, f"an integer >= {minimum}", where)
    return number


def cfg_float(
    config: dict[str, Any],
    key: str,
    default: Any = REQUIRED,
    *,
    minimum: float | None = None,
    positive: bool = False,
    where: str = "config.json",
) -> float:
    if config.get(key) is None:
        return float(_get(config, key, default, where))
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(key, value, "a finite number", where)
    if positive and value <= 0:
        raise _bad(key, value, "a number > 0", where)
    if minimum is not None and value < minimum:
        raise _bad(key, value, f"a number >= {minimum}", where)
    return float(value)


def cfg_bool(config: dict[str, Any], key: str, default: bool, *, where: str = "config.json") -> bool:
    value = _get(config, key, default, where)
    if not isinstance(value, bool):
        raise _bad(key, value, "true or false", where)
    return value


def cfg_str(config: dict[str, Any], key: str, default: Any = REQUIRED, *, where: str = "config.json") -> str:
    value = _get(config, key, default, where)
    if not isinstance(value, str):
        raise _bad(key, value, "a string", where)
    return value


def cfg_int_list(
    config: dict[str, Any], key: str, *, minimum: int = 0, where: str = "config.json"
) -> list[int]:
    """A list of integers (absent or null: empty)."""
    value = _get(config, key, [], where)
    numbers = [as_int(v) for v in value] if isinstance(value, list) else [None]
    if any(n is None or n < minimum for n in numbers):
        raise _bad(key, value, f"a list of integers >= {minimum}", where)
    return [n for n in numbers if n is not None]


def cfg_dict(config: dict[str, Any], key: str, *, where: str = "config.json") -> dict[str, Any]:
    """An object (absent or null: empty)."""
    value = _get(config, key, {}, where)
    if not isinstance(value, dict):
        raise _bad(key, value, "an object", where)
    return value
