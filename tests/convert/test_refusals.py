"""What `anyquant convert` refuses, and how it says so: per layer with the reason, nothing written;
`--allow-reorder` makes act-order down projections exact; `--requantize` reports its error; an
existing or half-written output directory is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyquant import LLM
from anyquant.cli.main import main
from anyquant.convert.converter import (
    PARTIAL_MARKER,
    ConversionRefused,
    ConvertOptions,
    convert_checkpoint,
)
from anyquant.convert.quantize import quantize_checkpoint
from anyquant.errors import AnyquantError
from anyquant.quant.formats.base import WriteOptions
from anyquant.utils.tiny_model import write_tiny_model
from tests.convert._helpers import dequantized_layers, tensors

IDS = [256, 5, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114]


@pytest.fixture(scope="module")
def act_order(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("act_order")
    dense = write_tiny_model(root / "dense", "llama", seed=5)
    out = root / "gptq-act-order"
    quantize_checkpoint(dense, out, "gptq", WriteOptions(bits=4, group_size=32, sym=True, act_order=True))
    return out


@pytest.fixture(scope="module")
def down_only_act_order(act_order: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint with a trivial g_idx everywhere but the down projections (still a valid
    GPTQ checkpoint, other weights): the case --allow-reorder converts exactly."""
    out = tmp_path_factory.mktemp("down_only") / "m"
    out.mkdir()
    for f in act_order.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    t = load_file(str(act_order / "model.safetensors"))
    for name in list(t):
        if name.endswith(".g_idx") and "down_proj" not in name:
            t[name] = (torch.arange(t[name].numel()) // 32).to(torch.int32)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_act_order_refused_per_layer_with_reason(act_order: Path, tmp_path: Path) -> None:
    dst = tmp_path / "awq"
    with pytest.raises(ConversionRefused) as info:
        convert_checkpoint(act_order, dst, "awq")
    text = str(info.value)
    refused = {r.prefix: r.reason or "" for r in info.value.refused}
    down, q = "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"
    assert "awq has no act-order: layer model.layers.0.mlp.down_proj has a non-trivial g_idx" in refused[down]
    assert "use --allow-reorder to permute the input dimension" in refused[down]
    assert "hidden state" in refused[q] and "--allow-reorder" not in refused[q].split(";")[0]
    assert f"{q}: " in text and "--requantize" in text
    assert not dst.exists()  # nothing half-written is left behind
    # Through the command line: exit status 2 and the same message.
    assert main(["convert", str(act_order), str(dst), "--format", "awq"]) == 2


def test_allow_reorder_makes_down_projections_exact(down_only_act_order: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionRefused, match="use --allow-reorder"):
        convert_checkpoint(down_only_act_order, tmp_path / "refused", "compressed-tensors")
    dst = tmp_path / "ct"
    report = convert_checkpoint(
        down_only_act_order, dst, "compressed-tensors", ConvertOptions(allow_reorder=True)
    )
    how = {r.prefix: r.how for r in report.layers}
    assert how["model.layers.1.mlp.down_proj"] == "reordered"
    assert how["model.layers.1.mlp.gate_proj"] == "reordered"
    assert how["model.layers.1.self_attn.o_proj"] == "exact"
    # Same model: fp32 logits agree to summation-order rounding (the down sums run permuted).
    ref = LLM(down_only_act_order, dtype="float32", kernel="reference").logits(IDS)
    got = LLM(dst, dtype="float32", kernel="reference").logits(IDS)
    assert torch.allclose(ref, got, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert not torch.equal(  # the rows really moved
        tensors(dst)["model.layers.1.mlp.gate_proj.weight_packed"],
        convert_checkpoint_rows(down_only_act_order, tmp_path),
    )


def convert_checkpoint_rows(src: Path, tmp_path: Path) -> torch.Tensor:
    """gate_proj as written without any permutation (the same layer converted on its own format)."""
    dst = tmp_path / "gptq-copy"
    convert_checkpoint(src, dst, "gptq", ConvertOptions())
    return tensors(dst)["model.layers.1.mlp.gate_proj.qweight"]


def test_requantize_reports_error_per_layer(act_order: Path, tmp_path: Path) -> None:
    dst = tmp_path / "awq"
    report = convert_checkpoint(act_order, dst, "awq", ConvertOptions(requantize=True))
    requantized = [r for r in report.layers if r.how == "requantized"]
    assert requantized and all(r.rel_error is not None and 0 < r.rel_error < 0.2 for r in requantized)
    assert all("non-trivial g_idx" in (r.reason or "") for r in requantized)
    # The reported error is the real one: each side decoded by its own reader.
    src_w, dst_w = dequantized_layers(act_order), dequantized_layers(dst)
    for r in requantized:
        a, b = src_w[r.prefix], dst_w[r.prefix]
        assert r.rel_error == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-9)


def test_lossy_bit_width_refused(tmp_path: Path) -> None:
    dense = write_tiny_model(tmp_path / "dense", "llama", seed=6)
    src = tmp_path / "gptq8"
    quantize_checkpoint(dense, src, "gptq", WriteOptions(bits=8, group_size=32, sym=True))
    with pytest.raises(
        ConversionRefused, match=r"model\.layers\.0\.self_attn\.q_proj: awq cannot hold it exactly: levels"
    ):
        convert_checkpoint(src, tmp_path / "awq", "awq")


def test_output_directory_refusals(act_order: Path, tmp_path: Path) -> None:
    dense = write_tiny_model(tmp_path / "dense", "llama", seed=7)
    with pytest.raises(AnyquantError, match="is not quantized"):
        convert_checkpoint(dense, tmp_path / "x", "awq")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(AnyquantError, match="exists and is not empty"):
        convert_checkpoint(act_order, busy, "gptq")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / PARTIAL_MARKER).write_text("")
    (partial / ".shard-0.tmp").write_bytes(b"x")
    with pytest.raises(AnyquantError, match=r"unfinished conversion.*do not resume"):
        convert_checkpoint(act_order, partial, "gptq")
    convert_checkpoint(act_order, partial, "gptq", ConvertOptions(overwrite=True))
    assert (partial / "config.json").exists() and not (partial / PARTIAL_MARKER).exists()


def test_cli_reports_each_layer(
    down_only_act_order: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "awq"
    argv = [
        "convert",
        str(down_only_act_order),
        str(dst),
        "--format",
        "awq",
        "--allow-reorder",
        "--pad-for-tp",
        "2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "padded: config.json intermediate_size: 160 -> 256" in out
    assert "model.layers.0.mlp.down_proj" in out and "reordered" in out and "exact" in out
    assert main(argv) == 2  # a second run refuses the now non-empty directory
    assert "exists and is not empty" in capsys.readouterr().err
