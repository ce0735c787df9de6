"""The preflight (`inspect`) refuses exactly what loading refuses, with the same message.

Every tensor of a checkpoint is corrupted in turn (a wrong shape, an extra dimension, a wrong
dtype, deleted) and the checkpoint is then both described (headers only) and loaded: the two
must agree, and name the tensor with what was expected. A tensor class the preflight forgets to
check (norms, biases, embeddings, scales, zero points, g_idx, ...) shows up as a disagreement.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant.cli.main import main
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.errors import AnyquantError
from anyquant.loading.describe import describe_checkpoint
from anyquant.loading.loader import load_model
from anyquant.loading.progress import LoadProgress
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_model import write_tiny_model

Tensors = dict[str, torch.Tensor]


def _grow(t: torch.Tensor) -> torch.Tensor:
    """One more entry along the last dimension (a 0-d scalar becomes [2])."""
    if t.dim() == 0:
        return t.reshape(1).repeat(2)
    pad = torch.zeros((*t.shape[:-1], 1), dtype=t.dtype)
    return torch.cat([t, pad], dim=-1)


def _extra_dim(t: torch.Tensor) -> torch.Tensor:
    """A leading dimension of 1 ([] and [1] are both per-tensor scales, so a scalar becomes [1, 1])."""
    return t.reshape(1, 1) if t.dim() == 0 else t.unsqueeze(0)


def _retype(t: torch.Tensor) -> torch.Tensor:
    """A dtype no reader accepts for that tensor: floats become int16, integers float32."""
    if t.is_floating_point():
        return t.float().to(torch.int16)
    return t.to(torch.float32)


CORRUPTIONS: dict[str, Callable[[Tensors, str], None]] = {
    "shape": lambda sd, n: sd.__setitem__(n, _grow(sd[n])),
    "extra-dim": lambda sd, n: sd.__setitem__(n, _extra_dim(sd[n])),
    "dtype": lambda sd, n: sd.__setitem__(n, _retype(sd[n])),
    "missing": lambda sd, n: sd.pop(n),
}
# Tensors a reader may do without: GPTQ's g_idx (no act-order then), stored input scales of
# dynamic schemes, empty placeholders.
OPTIONAL_SUFFIXES = (".g_idx",)
# A tied LM head falls back to the embedding: a missing embedding is reported as a missing head.
TIED = {"model.embed_tokens.weight": "lm_head.weight"}


def _outcome(call: Callable[[], object]) -> str | None:
    try:
        call()
    except AnyquantError as exc:
        return str(exc)
    return None


def preflight_and_load(path: Path) -> tuple[str | None, str | None]:
    """(inspect's error, loading's error), None where it passed."""
    pre = _outcome(lambda: describe_checkpoint(path))
    load = _outcome(lambda: load_model(path, progress=LoadProgress(str(path), show_bar=False)))
    return pre, load


def _case_dir(base: Path, tmp: Path) -> Path:
    """A copy of `base` without its weights (config, tokenizer, side files)."""
    case = tmp / "case"
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(base, case, ignore=shutil.ignore_patterns("*.safetensors"))
    return case


def disagreements(
    base: Path, tmp: Path, names: list[str], kinds: tuple[str, ...] = tuple(CORRUPTIONS)
) -> list[str]:
    """Corrupt each of `names` in each of `kinds` of ways; describe what went wrong (empty: all agree)."""
    original = load_file(str(base / "model.safetensors"))
    case = _case_dir(base, tmp)
    problems = []
    for name in names:
        for kind in kinds:
            corrupt = CORRUPTIONS[kind]
            tensors = dict(original)
            corrupt(tensors, name)
            save_file(tensors, str(case / "model.safetensors"), metadata={"format": "pt"})
            pre, load = preflight_and_load(case)
            where = f"{kind} {name}"
            if pre != load:
                problems.append(f"{where}: inspect says {pre!r}, loading says {load!r}")
            elif load is None:
                if not (kind == "missing" and name.endswith(OPTIONAL_SUFFIXES)):
                    problems.append(f"{where}: both accept the corrupted checkpoint")
            elif name.rsplit(".", 1)[0] not in load and TIED.get(name, name) not in load:
                problems.append(f"{where}: the message does not name the tensor's layer: {load!r}")
    return problems


def test_stories_every_tensor(stories: Path, tmp_path: Path) -> None:
    base = stories / "hf"
    names = sorted(load_file(str(base / "model.safetensors")))
    assert len(names) > 40  # embeddings, norms, every projection of every layer
    first = [n for n in names if not n.startswith("model.layers.") or n.startswith("model.layers.0.")]
    # Every way on the embedding, the final norm and every tensor of layer 0; a wrong shape everywhere.
    problems = disagreements(base, tmp_path, first)
    problems += disagreements(base, tmp_path, [n for n in names if n not in first], ("shape",))
    assert problems == []
    assert preflight_and_load(base) == (None, None)


def test_stories_messages_name_tensor_and_both_shapes(
    stories: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's two examples, through the command line: inspect and generate print the same line."""
    name = "model.layers.0.mlp.down_proj.weight"
    case = _case_dir(stories / "hf", tmp_path)
    original = load_file(str(stories / "hf" / "model.safetensors"))
    expected = {
        "shape": f"tensor '{name}': shape [64, 99], expected [64, 172] (from config.json)",
        "int16": f"tensor '{name}': dtype torch.int16 for an unquantized layer; expected a float dtype",
    }
    edits = {"shape": original[name][:, :99].contiguous(), "int16": original[name].to(torch.int16)}
    for kind, tensor in edits.items():
        save_file({**original, name: tensor}, str(case / "model.safetensors"))
        for argv in (["inspect", str(case)], ["generate", str(case), "--prompt", "hi", "--max-tokens", "1"]):
            capsys.readouterr()
            assert main(argv) == 2
            assert capsys.readouterr().err.strip() == f"anyquant {argv[0]}: error: {expected[kind]}"


# Quantized: every format the project writes, corrupting every tensor of one attention and one
# MLP projection (each holds every tensor class its format stores) and the unquantized rest.
FORMATS: dict[str, tuple[str, WriteOptions]] = {
    "gptq-actorder-asym": ("gptq", WriteOptions(bits=4, group_size=32, act_order=True)),
    "gptq-v2-8bit-channel": ("gptq-v2", WriteOptions(bits=8, group_size=-1)),
    "awq-g32": ("awq", WriteOptions(bits=4, group_size=32)),
    "ct-w4a16-asym": ("compressed-tensors", WriteOptions(scheme="W4A16_ASYM", group_size=32)),
    "ct-w8a8": ("compressed-tensors", WriteOptions(scheme="W8A8")),
    "ct-fp8-block": ("compressed-tensors", WriteOptions(scheme="FP8_BLOCK")),
    "fp8-block": ("fp8-block", WriteOptions(block_size=(32, 32))),
    "fp8-tensor": ("fp8", WriteOptions()),
    "fbgemm-fp8": ("fbgemm-fp8", WriteOptions()),
    "lmdeploy-int8": ("lmdeploy-int8", WriteOptions()),
}
LAYERS = ("model.layers.0.self_attn.q_proj.", "model.layers.0.mlp.down_proj.")


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("dense"), "llama", seed=3, intermediate_size=128)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quantized_every_tensor_class(name: str, tiny_dense: Path, tmp_path: Path) -> None:
    fmt, options = FORMATS[name]
    out = tmp_path / name
    quantize_checkpoint(tiny_dense, out, fmt, options)
    stored = sorted(load_file(str(out / "model.safetensors")))
    names = [n for n in stored if n.startswith(LAYERS)]
    assert len(names) >= 3
    assert disagreements(out, tmp_path, names) == []
    assert preflight_and_load(out) == (None, None)


# Tensors a layer may carry in some format, added where absent with a shape no reader expects.
EXTRA_SUFFIXES = (
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
    "weight_packed",
    "weight_shape",
    "weight_scale",
    "weight_scale_inv",
    "weight_zero_point",
    "weight_g_idx",
    "input_scale",
    "input_zero_point",
    "activation_scale",
    "scale",
    "bias",
    "not_a_tensor_any_format_reads",
)


def extra_tensor_disagreements(base: Path, tmp: Path, prefix: str) -> tuple[list[str], int]:
    """Add each absent EXTRA_SUFFIXES tensor to `prefix` in turn: (disagreements, refusals)."""
    original = load_file(str(base / "model.safetensors"))
    case = _case_dir(base, tmp)
    problems, refused = [], 0
    for suffix in EXTRA_SUFFIXES:
        name = f"{prefix}.{suffix}"
        if name in original:
            continue
        dtype = (
            torch.int32
            if suffix.startswith(("q", "g_idx", "weight_packed", "weight_shape"))
            else torch.float32
        )
        save_file({**original, name: torch.ones(3, dtype=dtype)}, str(case / "model.safetensors"))
        pre, load = preflight_and_load(case)
        if pre != load:
            problems.append(f"extra {name}: inspect says {pre!r}, loading says {load!r}")
        refused += load is not None
    return problems, refused


def test_stories_extra_tensors(stories: Path, tmp_path: Path) -> None:
    problems, refused = extra_tensor_disagreements(stories / "hf", tmp_path, "model.layers.0.mlp.down_proj")
    assert problems == []
    assert refused == len(EXTRA_SUFFIXES)  # nothing extra belongs to an unquantized layer


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quantized_extra_tensors(name: str, tiny_dense: Path, tmp_path: Path) -> None:
    fmt, options = FORMATS[name]
    out = tmp_path / name
    quantize_checkpoint(tiny_dense, out, fmt, options)
    problems, refused = extra_tensor_disagreements(out, tmp_path, "model.layers.0.mlp.down_proj")
    assert problems == []
    assert refused >= 1  # at least the tensor no format reads
