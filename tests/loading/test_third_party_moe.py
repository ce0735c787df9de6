"""MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) and Qwen2 checkpoints written by the real tools
(llm-compressor, GPT-QModel, AutoAWQ) against the logits of their own reference loaders.

The fixtures are committed under tests/fixtures/third_party_moe (see its README for the tool, the
recipe and the reference loader of each); tests/fixtures/generate made them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyquant import LLM, SamplingParams
from anyquant.errors import UnsupportedError
from tests.helpers.errors import rel_err

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "third_party_moe"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
PROMPTS = 3
REL_L2 = 2e-2
ARGMAX_AGREE = 0.98

# Known disagreements with a stored reference, investigated (see the fixtures' README): the reason
# and the exception it shows as. Strict: the day anyquant changes and the test passes, the marker
# has to go. None today: the W8A8 Qwen3-MoE fixture failed while its experts ran on the reference
# kernel (fp32 matmul of fake-quantized activations); on the int8 GEMM kernel it is within bounds.
KNOWN: dict[str, tuple[str, type[Exception]]] = {}

# Fixtures whose multi-token last-position logits sit on activation rounding ties, so the tight
# "activation quantization is applied" check cannot hold for them; test_int8_activation_scale_...
# checks them on the 1-token prompt instead.
TIE_SENSITIVE = {
    "qwen3moe-w8a8int8-gptq-llmc": (
        "dynamic int8 activations with compressed-tensors' amax / 127.5 put each row's largest-magnitude "
        "element exactly on a rounding tie (+-127.5), so last-bit arithmetic differences flip it between "
        "-127 and -128: the 1-token prompt matches the reference exactly, multi-token prompts differ by "
        "up to 8e-3 relative L2. Bit-identical op order would be needed"
    ),
}


def load_llm(name: str) -> LLM:
    try:
        return LLM(FIXTURES / name, dtype="float32")
    except UnsupportedError as exc:
        if "not supported" in str(exc):
            pytest.skip(str(exc))
        raise


def greedy(llm: LLM, prompt: torch.Tensor, steps: int) -> list[int]:
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    return llm.generate(prompt_token_ids=[prompt.tolist()], sampling_params=params)[0].token_ids


def assert_logits_match(llm: LLM, ref: dict[str, torch.Tensor], key: str) -> None:
    for i in range(PROMPTS):
        ours = llm.logits(ref[f"prompt_{i}"].tolist())
        theirs = ref[f"{key}_{i}"]
        assert ours.shape == theirs.shape, (i, ours.shape, theirs.shape)
        assert rel_err(ours, theirs) <= REL_L2, (i, rel_err(ours, theirs))
        agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
        assert agree >= ARGMAX_AGREE, (i, agree)


def test_fixtures_are_present_and_documented() -> None:
    assert len(NAMES) >= 10, NAMES
    readme = (FIXTURES / "README.md").read_text()
    for name in NAMES:
        assert f"`{name}`" in readme, name
        report = json.loads((FIXTURES / name / "reference.json").read_text())
        assert report["checkpoint"] == name
        assert report["compute_dtype"] == "float32"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[n][0], raises=KNOWN[n][1]))
        if n in KNOWN
        else n
        for n in NAMES
    ],
)
def test_llm_logits_and_greedy_tokens_reproduce_reference(name: str) -> None:
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    llm = load_llm(name)
    assert_logits_match(llm, ref, "logits")
    tokens = ref["greedy_tokens"]
    assert greedy(llm, ref["greedy_prompt"], len(tokens)) == tokens.tolist()


def test_int8_activation_scale_follows_the_reference_loader() -> None:
    """compressed-tensors' reference scales dynamic int8 activations by amax / 127.5: with it the 1-token
    prompt (no cross-token effects) matches exactly, and every prompt is nearer the reference than the
    stored variant that uses amax / 127 (reference.json, int127)."""
    name = "qwen3moe-w8a8int8-gptq-llmc"
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    llm = load_llm(name)
    assert rel_err(llm.logits(ref["prompt_0"].tolist()), ref["logits_0"]) < 1e-6
    for i in range(PROMPTS):
        ours = llm.logits(ref[f"prompt_{i}"].tolist())
        assert rel_err(ours, ref[f"logits_{i}"]) < rel_err(ours, ref[f"int127_logits_{i}"]), i


ACTIVATION_QUANTIZED = [
    n
    for n in NAMES
    if "wonly_last_logits_0" in load_file(str(FIXTURES / n / "reference.safetensors"))
    and n not in KNOWN
    and n not in TIE_SENSITIVE
]


@pytest.mark.parametrize("name", ACTIVATION_QUANTIZED)
def test_activation_quantization_is_applied(name: str) -> None:
    """Activation-quantized fixtures: our last-position logits are much nearer the reference than the
    reference's own weight-only run is (a path that skipped activation quantization would not be).

    Prompts 0 and 1 only: on the 33-token prompt a 1e-7 summation-order difference can move one
    activation across an int8/fp8 rounding boundary, which costs ~5e-3 there (within REL_L2)."""
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    llm = load_llm(name)
    key = "logits"
    for i in range(2):
        ours = llm.logits(ref[f"prompt_{i}"].tolist())[-1]
        theirs = ref[f"{key}_{i}"][-1]
        wonly_gap = rel_err(ref[f"wonly_last_logits_{i}"], theirs)
        assert rel_err(ours, theirs) < wonly_gap / 4, (i, rel_err(ours, theirs), wonly_gap)
