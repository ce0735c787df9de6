"""`anyquant inspect` describes every third-party checkpoint correctly, from headers only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.describe import describe_checkpoint

# fixture -> (format name, expected scheme fields of every quantized layer)
EXPECTED: dict[str, tuple[str | None, dict[str, Any]]] = {
    "llama-bf16-original": (None, {}),
    "llama-awq-gemm-4bit-g128-autoawq": (
        "awq",
        {"weight": "uint4", "granularity": "group", "group_size": 128, "has_zero": True, "act": None},
    ),
    "llama-gptq-4bit-g128-sym-gptqmodel": (
        "gptq",
        {
            "weight": "uint4",
            "granularity": "group",
            "group_size": 128,
            "has_zero": False,
            "act_order": False,
            "act": None,
        },
    ),
    "llama-w4a16-g128-gptq-llmc": (
        "compressed-tensors",
        {"weight": "uint4", "granularity": "group", "group_size": 128, "has_zero": False, "act": None},
    ),
    "llama-fp8dynamic-llmc": (
        "compressed-tensors",
        {
            "weight": "fp8_e4m3",
            "granularity": "channel",
            "act": {"type": "fp8_e4m3", "dynamic": True, "granularity": "token"},
        },
    ),
    "llama-w8a8int8-smoothquant-lmdeploy": (
        "smooth_quant",
        {
            "weight": "int8",
            "granularity": "channel",
            "act": {"type": "int8", "dynamic": True, "granularity": "token"},
        },
    ),
}
DECODER_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Checkpoint, name: str) -> None:
        raise AssertionError(f"inspect read tensor data ({name})")

    monkeypatch.setattr(Checkpoint, "read", refuse)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_describes_third_party_checkpoint(third_party: Path, name: str) -> None:
    fmt_name, scheme = EXPECTED[name]
    doc = describe_checkpoint(third_party / name)
    assert doc["architecture"] == "LlamaForCausalLM"
    if fmt_name is None:
        assert doc["format"] is None and doc["totals"]["quantized_layers"] == 0
        return
    assert doc["format"]["name"] == fmt_name
    assert doc["format"]["config_source"].endswith("config.json: quantization_config")
    assert doc["totals"]["quantized_layers"] == DECODER_LINEARS
    assert doc["unquantized_layers"] == ["lm_head"]
    for group in doc["groups"]:
        if group["pattern"] == "lm_head":
            # The bf16 LM head's fast path where the CPU has it (pinned in test_avx512_kernel.py).
            assert group["scheme"] is None and group["kernel"] in (
                "dense",
                "cpu_avx512_lm_head",
                "cpu_avx2_lm_head",
            )
            continue
        got = group["scheme"]
        for key, want in scheme.items():
            value = got[key]
            if isinstance(want, dict):
                assert value is not None and {k: value[k] for k in want} == want, (group["pattern"], value)
            else:
                assert value == want, (group["pattern"], key, value)
        assert group["kernel"]
        assert all(r["reason"] for r in group["rejected_kernels"])


def test_inspect_json_cli(third_party: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "anyquant",
            "inspect",
            "--json",
            str(third_party / "llama-awq-gemm-4bit-g128-autoawq"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    doc = json.loads(proc.stdout)
    assert doc["format"]["name"] == "awq"
    groups = {g["pattern"]: g for g in doc["groups"]}
    assert groups["model.layers.*.mlp.down_proj"]["stored"]["qweight"] == "I32[1024, 32]"
    assert groups["model.layers.*.mlp.down_proj"]["count"] == 2


def test_inspect_text_cli_names_kernels(third_party: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "anyquant",
            "inspect",
            str(third_party / "llama-gptq-4bit-g128-sym-gptqmodel"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "format:" in proc.stdout and "gptq" in proc.stdout
    assert "kernel:" in proc.stdout
    assert "not dense: layer is quantized" in proc.stdout  # every better-ranked kernel says why not
