"""Property: whatever a checkpoint's quantization_config says, loading ends in an anyquant error
naming the config (or the tensor that disagrees with it), or in a model that still computes what
the unmutated checkpoint computes.

Bases: one tiny real model written by `anyquant quantize` in every format family the loader reads
(awq, gptq with and without act-order, compressed-tensors int4 / W8A8 / FP8 block, fp8 block and
per-tensor, fbgemm_fp8, lmdeploy smooth_quant). Each example changes one to three entries anywhere
in the section (bits, group_size, sym, desc_act, config_groups.*.weights.*, weight_block_size,
ignore / modules_to_not_convert lists, quant_method itself...) to a wrong-typed, zero, negative,
huge or neighbouring value, deletes entries, or replaces the whole section. A load that succeeds
must give finite logits within 20 % (relative L2) of the unmutated checkpoint's: a config that
legitimately changes the computation (e.g. adding dynamic activation quantization) moves them by a
few percent, a misread weight layout by about 100 %.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from anyquant.convert.quantize import quantize_checkpoint
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_model import write_tiny_model
from tests.loading.properties import (
    EDGE_INTS,
    Outcome,
    assert_names,
    fuzz_settings,
    json_values,
    load_outcome,
    record,
    rel_l2,
    weighted,
)

# Every Linear a multiple of 32 so that every writer quantizes every layer (group 32, block 32).
TINY = dict(num_hidden_layers=1, hidden_size=64, head_dim=16, intermediate_size=64, vocab_size=259)
BASES: dict[str, tuple[str, WriteOptions]] = {
    "awq": ("awq", WriteOptions(bits=4, group_size=32)),
    "gptq": ("gptq", WriteOptions(bits=4, group_size=32, sym=True)),
    "gptq-act-order": ("gptq", WriteOptions(bits=3, group_size=32, act_order=True)),
    "ct-w4a16": ("compressed-tensors", WriteOptions(scheme="W4A16", group_size=32)),
    "ct-w8a8": ("compressed-tensors", WriteOptions(scheme="W8A8")),
    "ct-fp8-block": ("compressed-tensors", WriteOptions(scheme="FP8_BLOCK", block_size=(32, 32))),
    "fp8-block": ("fp8-block", WriteOptions(block_size=(32, 32))),
    "fp8-tensor": ("fp8", WriteOptions()),
    "fbgemm-fp8": ("fbgemm-fp8", WriteOptions()),
    "lmdeploy-int8": ("lmdeploy-int8", WriteOptions()),
}
QUANT_METHODS = ["awq", "gptq", "compressed-tensors", "fp8", "fbgemm_fp8", "smooth_quant", "bitsandbytes", ""]
Path_ = tuple[Any, ...]  # keys / list indices from the section's root


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("qc-bases")
    dense = write_tiny_model(root / "dense", "llama", seed=11, **TINY)
    out: dict[str, tuple[Path, torch.Tensor]] = {}
    for name, (fmt, options) in BASES.items():
        path = root / name
        quantize_checkpoint(dense, path, fmt, options)
        outcome = load_outcome(path)
        assert outcome.logits is not None, f"base {name} does not load: {outcome.error}"
        out[name] = (path, outcome.logits)
    yield out


def section(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def paths(value: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every entry of a JSON tree, parents before children."""
    found: list[Path_] = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += paths(child, (*prefix, i))
    return found


def lookup(tree: Any, where: Path_) -> Any:
    for step in where:
        tree = tree[step]
    return tree


def near(value: Any) -> st.SearchStrategy[Any]:
    """Neighbours of a valid value: other bit widths and group sizes, flipped flags, wrong types."""
    if isinstance(value, bool):
        return st.sampled_from([not value, int(value), str(value).lower(), None])
    if isinstance(value, int | float):
        return st.sampled_from(
            [
                value + 1,
                value - 1,
                value * 2,
                -value,
                0,
                3,
                5,
                16,
                64,
                str(value),
                [value],
                float(value) + 0.5,
            ]
        )
    if isinstance(value, str):
        return st.sampled_from(
            [
                value.upper(),
                value + "x",
                "",
                "int",
                "float",
                "tensor",
                "channel",
                "group",
                "block",
                "token",
                "e5m2",
                "static",
                "dynamic",
                "pack-quantized",
                "float-quantized",
            ]
        )
    if isinstance(value, list):
        return st.one_of(
            st.just([]), st.lists(st.sampled_from([*value, "lm_head", "re:.*", 7, None]), max_size=4)
        )
    return json_values()


@st.composite
def changes_for(draw: st.DrawFn, qc: dict[str, Any]) -> tuple[tuple[Any, ...], ...]:
    entries = paths(qc)
    common_fields = [
        ("bits",),
        ("group_size",),
        ("weight_block_size",),
        ("ignore",),
        ("modules_to_not_convert",),
        ("desc_act",),
        ("sym",),
        ("activation_scheme",),
    ]
    one = weighted(
        (
            6,
            st.sampled_from(entries).flatmap(
                lambda p: st.tuples(st.just("set"), st.just(p), near(lookup(qc, p)))
            ),
        ),
        (2, st.tuples(st.just("set"), st.sampled_from(entries), json_values())),
        (1, st.tuples(st.just("set"), st.just(("quant_method",)), st.sampled_from(QUANT_METHODS))),
        (1, st.tuples(st.just("set"), st.sampled_from(common_fields), json_values())),
        (2, st.tuples(st.just("drop"), st.sampled_from(entries))),
    )
    return draw(
        weighted(
            (9, st.lists(one, min_size=1, max_size=3).map(tuple)),
            (1, st.tuples(st.tuples(st.just("whole"), json_values()))),
        )
    )


def mutated(qc: dict[str, Any], changes: tuple[tuple[Any, ...], ...]) -> Any:
    out: Any = json.loads(json.dumps(qc))
    for change in changes:
        if change[0] == "whole":
            out = change[1]
            continue
        where: Path_ = change[1]
        try:
            parent = lookup(out, where[:-1])
            if change[0] == "set":
                parent[where[-1]] = change[2]
            elif isinstance(parent, dict):
                parent.pop(where[-1], None)
            else:
                del parent[where[-1]]
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed or replaced the parent
    return out


def check(base: Path, base_logits: torch.Tensor, changes: tuple[tuple[Any, ...], ...]) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix="qc-case-"))
    try:
        case = work / "m"
        shutil.copytree(base, case)
        config = json.loads((case / "config.json").read_text())
        config["quantization_config"] = mutated(config["quantization_config"], changes)
        (case / "config.json").write_text(json.dumps(config))
        outcome = load_outcome(case)
        if outcome.error is not None:
            record(f"refused: {type(outcome.error).__name__}")
            fields = [str(step) for c in changes if c[0] != "whole" for step in c[1] if isinstance(step, str)]
            assert_names(outcome.error, "quantization_config", "config.json", *fields)
            return outcome
        assert outcome.logits is not None
        err = rel_l2(outcome.logits, base_logits)
        record("loaded, same logits" if err == 0 else "loaded, logits moved")
        assert err < 0.2, f"loaded with logits {err:.2f} (relative L2) away from the checkpoint's: {changes}"
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Cases found by hypothesis or written by hand; each once failed or guards one check.
@example(name="gptq", changes=(("set", ("bits",), 8),))
@example(name="gptq", changes=(("set", ("group_size",), 0),))
@example(name="gptq", changes=(("set", ("group_size",), "32"),))
@example(name="gptq-act-order", changes=(("set", ("desc_act",), False),))
@example(name="awq", changes=(("set", ("quant_method",), "gptq"),))
@example(name="awq", changes=(("set", ("modules_to_not_convert",), 5),))
@example(name="ct-w4a16", changes=(("set", ("config_groups", "group_0", "weights", "num_bits"), 8),))
@example(name="ct-w4a16", changes=(("set", ("ignore",), [None]),))
@example(name="fp8-block", changes=(("set", ("weight_block_size",), [0, 32]),))
@example(name="fp8-block", changes=(("set", ("weight_block_size",), [32]),))
@example(name="fbgemm-fp8", changes=(("set", ("activation_scale_ub",), "x"),))
@example(name="lmdeploy-int8", changes=(("whole", [1]),))
@example(name="lmdeploy-int8", changes=(("set", ("quant_dtype",), []),))
@given(name=st.sampled_from(sorted(BASES)), changes=st.data())
@fuzz_settings(max_examples=60)
def test_any_quantization_config_mutation_is_refused_clearly_or_loads_the_same_model(
    bases: dict[str, tuple[Path, torch.Tensor]], name: str, changes: Any
) -> None:
    path, logits = bases[name]
    if not isinstance(changes, tuple):  # drawn: the mutations depend on this base's section
        changes = changes.draw(changes_for(section(path)), label="changes")
    check(path, logits, changes)


def test_bases_cover_every_quant_method(bases: dict[str, tuple[Path, torch.Tensor]]) -> None:
    methods = {section(path)["quant_method"] for path, _ in bases.values()}
    assert methods == {"awq", "gptq", "compressed-tensors", "fp8", "fbgemm_fp8", "smooth_quant"}


def test_edge_ints_are_refused_as_bits(bases: dict[str, tuple[Path, torch.Tensor]]) -> None:
    """Every adversarial integer as GPTQ's bits: refused with the field named, never a crash."""
    path, logits = bases["gptq"]
    for bits in [b for b in EDGE_INTS if b != 4]:
        outcome = check(path, logits, (("set", ("bits",), bits),))
        assert outcome.error is not None, bits
