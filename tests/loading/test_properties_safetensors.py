"""Property: whatever a safetensors file's bytes say, loading ends in an anyquant error that names
the file or tensor, or in a model identical to what the safetensors library itself reads.

Each example applies one mutation to a tiny real checkpoint's `model.safetensors`: the 8-byte
header length (zero, short, past the end, 2**64-1), the header JSON (not an object, invalid UTF-8,
duplicate names, padding), one entry's dtype / shape / data_offsets (wrong types, unknown dtypes,
out of range, overlapping, a size that disagrees with the shape), `__metadata__`, the data
section (truncated, trailing bytes), the order of entries. The independent reference is the
`safetensors` library: when anyquant loads a file, the library must accept it too, and the logits
must equal those of the tensors the library reads, re-saved cleanly by the library.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from anyquant.loading.checkpoint import SAFETENSORS_DTYPES
from anyquant.utils.tiny_model import write_tiny_model
from tests.loading.properties import (
    EDGE_INTS,
    Outcome,
    assert_names,
    fuzz_settings,
    json_values,
    load_outcome,
    time_limit,
)

# One decoder layer, 12 tensors: small enough that every example writes a fresh file in ~1 ms.
TINY = dict(num_hidden_layers=1, hidden_size=32, head_dim=8, intermediate_size=48, vocab_size=259)
FILE = "model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = write_tiny_model(tmp_path_factory.mktemp("st-base") / "tiny", "llama", seed=3, **TINY)
    yield path


def split_file(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_file(header_text: bytes, data: bytes, declared: int | None = None) -> bytes:
    length = len(header_text) if declared is None else declared
    return struct.pack("<Q", length % 2**64) + header_text + data


def entry_names(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# -- mutations: plain tuples, so regression cases read as data ---------------------------------
def apply(raw: bytes, mutation: tuple[Any, ...]) -> bytes:
    """The file `raw` with one mutation applied."""
    header, data = split_file(raw)
    names = entry_names(header)
    kind = mutation[0]
    text: bytes | None = None
    declared: int | None = None
    if kind == "set":  # ("set", tensor index, key, value): one field of one entry
        _, i, key, value = mutation
        header[names[i % len(names)]][key] = value
    elif kind == "drop":  # ("drop", tensor index, key)
        _, i, key = mutation
        header[names[i % len(names)]].pop(key, None)
    elif kind == "entry":  # ("entry", tensor index, value): the whole entry replaced
        _, i, value = mutation
        header[names[i % len(names)]] = value
    elif kind == "swap_offsets":  # two entries exchange their byte ranges
        _, i, j = mutation
        a, b = header[names[i % len(names)]], header[names[j % len(names)]]
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    elif kind == "shift":  # ("shift", tensor index, delta): both offsets moved
        _, i, delta = mutation
        begin, end = header[names[i % len(names)]]["data_offsets"]
        header[names[i % len(names)]]["data_offsets"] = [begin + delta, end + delta]
    elif kind == "metadata":
        header["__metadata__"] = mutation[1]
    elif kind == "header":  # the whole header replaced by any JSON value
        header = mutation[1]
    elif kind == "reorder":  # entries in another order (still a valid file)
        order = list(names)
        random.Random(mutation[1]).shuffle(order)
        header = {"__metadata__": header.get("__metadata__", {}), **{n: header[n] for n in order}}
    elif kind == "duplicate":  # ("duplicate", i, j): name i appears twice, the second time with j's entry
        _, i, j = mutation
        body = json.dumps(header)[:-1]
        text = f'{body}, "{names[i % len(names)]}": {json.dumps(header[names[j % len(names)]])}}}'.encode()
    elif kind == "declared":  # ("declared", length): the 8-byte header length field lies
        declared = mutation[1]
    elif kind == "pad":  # ("pad", n, byte): header padded (spaces are legal, others not)
        _, n, byte = mutation
        text = json.dumps(header).encode() + bytes([byte]) * n
    elif kind == "raw_header":  # ("raw_header", bytes): any bytes as the header
        text = mutation[1]
    elif kind == "truncate":  # ("truncate", n): the file cut to n bytes
        return raw[: mutation[1]]
    elif kind == "trailing":  # ("trailing", n): n stray bytes after the data
        return raw + b"\x00" * mutation[1]
    elif kind == "flip":  # ("flip", position, byte): one byte of the header overwritten
        _, pos, byte = mutation
        out = bytearray(raw)
        out[8 + pos % (len(raw) - 8 - len(data))] = byte
        return bytes(out)
    else:
        raise ValueError(f"unknown mutation {mutation!r}")
    if text is None:
        text = json.dumps(header).encode()
    return join_file(text, data, declared)


DTYPE_NAMES = [*SAFETENSORS_DTYPES, "F4", "I4", "f32", "float32", "", "Q4_0", "F8_E4M3FNUZ", "C64"]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-10, 10_000))
shapes = st.one_of(
    st.lists(ints, max_size=4),
    st.lists(st.integers(0, 300), min_size=1, max_size=3),
    json_values(),
)
offsets = st.one_of(st.lists(ints, min_size=0, max_size=3), st.tuples(ints, ints).map(list), json_values())
index = st.integers(0, 11)
mutations = st.one_of(
    st.tuples(
        st.just("set"), index, st.just("dtype"), st.one_of(st.sampled_from(DTYPE_NAMES), json_values())
    ),
    st.tuples(st.just("set"), index, st.just("shape"), shapes),
    st.tuples(st.just("set"), index, st.just("data_offsets"), offsets),
    st.tuples(st.just("set"), index, st.text(max_size=5), json_values()),
    st.tuples(st.just("drop"), index, st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("entry"), index, json_values()),
    st.tuples(st.just("swap_offsets"), index, index),
    st.tuples(st.just("shift"), index, st.integers(-300, 300)),
    st.tuples(st.just("metadata"), json_values()),
    st.tuples(st.just("header"), json_values()),
    st.tuples(st.just("reorder"), st.integers(0, 100)),
    st.tuples(st.just("duplicate"), index, index),
    st.tuples(st.just("declared"), st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, 5000))),
    st.tuples(st.just("pad"), st.integers(0, 64), st.sampled_from([0x20, 0x00, 0x0A, 0x41])),
    st.tuples(st.just("raw_header"), st.binary(max_size=40)),
    st.tuples(st.just("truncate"), st.integers(0, 20_000)),
    st.tuples(st.just("trailing"), st.integers(1, 64)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
)


def library_reads(path: Path) -> dict[str, torch.Tensor] | Exception:
    """What the safetensors library makes of the file (its own parser and checks)."""
    try:
        with time_limit(20.0):
            return load_file(str(path))
    except Exception as exc:  # the library raises its own error types
        return exc


def check(base: Path, mutation: tuple[Any, ...]) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix="st-case-"))
    try:
        case = work / "case"
        shutil.copytree(base, case)
        (case / FILE).write_bytes(apply((base / FILE).read_bytes(), mutation))
        outcome = load_outcome(case)
        library = library_reads(case / FILE)
        if outcome.error is not None:
            # A tensor whose name the mutation changed may be reported by its old name (missing).
            names = load_file(str(base / FILE)).keys() | (
                library.keys() if isinstance(library, dict) else set()
            )
            assert_names(outcome.error, FILE, *names)
            return outcome
        assert not isinstance(library, Exception), (
            f"anyquant loaded a file that the safetensors library refuses ({library}); mutation {mutation}"
        )
        # The same tensors, written cleanly by the library, must give the same model.
        clean = work / "clean"
        shutil.copytree(base, clean)
        save_file(library, str(clean / FILE), metadata={"format": "pt"})
        reference = load_outcome(clean)
        assert reference.logits is not None, f"the clean re-save was refused: {reference.error}"
        assert torch.equal(outcome.logits, reference.logits), (
            f"logits differ from the library's reading; {mutation}"
        )
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Cases found by hypothesis or written by hand; each once failed or guards one check.
@example(mutation=("set", 0, "data_offsets", [0, 2**64]))
@example(mutation=("set", 1, "shape", [-1, -32]))
@example(mutation=("set", 2, "shape", [2.5, 3]))
@example(mutation=("set", 3, "data_offsets", [10, 5]))
@example(mutation=("set", 3, "dtype", ["F32"]))
@example(mutation=("drop", 4, "data_offsets"))
@example(mutation=("entry", 5, "F32"))
@example(mutation=("swap_offsets", 0, 1))
@example(mutation=("shift", 2, 4))
@example(mutation=("metadata", [1, 2]))
@example(mutation=("metadata", {"format": 5}))
@example(mutation=("header", []))
@example(mutation=("duplicate", 0, 1))
@example(mutation=("declared", 2**64 - 1))
@example(mutation=("declared", 0))
@example(mutation=("pad", 8, 0x20))
@example(mutation=("pad", 3, 0x00))
@example(mutation=("raw_header", b"\xff\xfe"))
@example(mutation=("truncate", 8))
@example(mutation=("trailing", 3))
@given(mutation=mutations)
@fuzz_settings(max_examples=70)
def test_any_header_mutation_is_refused_clearly_or_loads_what_the_library_reads(
    base: Path, mutation: tuple[Any, ...]
) -> None:
    check(base, mutation)


def test_reference_cases_load_unchanged(base: Path) -> None:
    """Mutations that keep a valid file load, with the unmutated model's logits (so the property
    above is not satisfied by refusing everything)."""
    original = load_outcome(base).logits
    assert original is not None
    for mutation in [("reorder", 7), ("pad", 8, 0x20), ("metadata", {"format": "pt", "x": "y"})]:
        outcome = check(base, mutation)
        assert outcome.logits is not None and torch.equal(outcome.logits, original), mutation


# -- the shard index (model.safetensors.index.json) ----------------------------------------------
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def sharded(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """The same model in two shards with an index, as save_pretrained writes large models; and its
    logits."""
    path = tmp_path_factory.mktemp("st-sharded") / "tiny"
    shutil.copytree(base, path)
    tensors = load_file(str(path / FILE))
    (path / FILE).unlink()
    names = sorted(tensors)
    parts = (names[: len(names) // 2], names[len(names) // 2 :])
    for shard, part in zip(SHARDS, parts):
        save_file({n: tensors[n] for n in part}, str(path / shard), metadata={"format": "pt"})
    weight_map = {n: shard for shard, part in zip(SHARDS, parts) for n in part}
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    logits = load_outcome(path).logits
    assert logits is not None
    return path, logits


shard_names = st.one_of(
    st.sampled_from(
        [*SHARDS, "missing.safetensors", "", ".", "..", "/etc/hostname", "../tiny/config.json", "config.json"]
    ),
    json_values(),
)
index_mutations = st.one_of(
    st.tuples(st.just("map"), index, shard_names),
    st.tuples(st.just("map_drop"), index),
    st.tuples(st.just("map_add"), st.sampled_from(["lm_head.bias", "model.layers.7.x", ""]), shard_names),
    st.tuples(st.just("field"), st.sampled_from(["weight_map", "metadata"]), json_values()),
    st.tuples(st.just("whole"), json_values()),
)


def apply_to_index(index_json: dict[str, Any], mutation: tuple[Any, ...]) -> Any:
    out: Any = json.loads(json.dumps(index_json))
    names = sorted(out["weight_map"])
    kind = mutation[0]
    if kind == "map":
        out["weight_map"][names[mutation[1] % len(names)]] = mutation[2]
    elif kind == "map_drop":
        del out["weight_map"][names[mutation[1] % len(names)]]
    elif kind == "map_add":
        out["weight_map"][mutation[1]] = mutation[2]
    elif kind == "field":
        out[mutation[1]] = mutation[2]
    else:
        out = mutation[1]
    return out


# Shards named outside the model directory were opened (an error only because they were not safetensors).
@example(mutation=("map", 0, "/etc/hostname"))
@example(mutation=("map", 1, "../tiny/config.json"))
@example(mutation=("map", 2, 5))
@example(mutation=("map", 3, SHARDS[0]))
@example(mutation=("map_drop", 4))
@example(mutation=("field", "weight_map", []))
@example(mutation=("whole", "x"))
@given(mutation=index_mutations)
@fuzz_settings(max_examples=20)
def test_any_index_mutation_is_refused_clearly_or_loads_the_same_model(
    sharded: tuple[Path, torch.Tensor], mutation: tuple[Any, ...]
) -> None:
    model, original = sharded
    work = Path(tempfile.mkdtemp(prefix="st-index-"))
    try:
        case = work / "tiny"
        shutil.copytree(model, case)
        (case / INDEX).write_text(
            json.dumps(apply_to_index(json.loads((model / INDEX).read_text()), mutation))
        )
        outcome = load_outcome(case)
        if outcome.error is not None:
            assert_names(
                outcome.error, INDEX, *SHARDS, *json.loads((model / INDEX).read_text())["weight_map"]
            )
        else:
            assert outcome.logits is not None
            assert torch.equal(outcome.logits, original), mutation
    finally:
        shutil.rmtree(work, ignore_errors=True)
