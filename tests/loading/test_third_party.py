"""Checkpoints written by the real tools (AutoAWQ, GPT-QModel, llm-compressor, lmdeploy) against
the logits of their own reference loaders (../shared/fixtures/third_party, see its README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyquant import LLM, SamplingParams
from anyquant.loading.checkpoint import Checkpoint
from anyquant.loading.loader import build_on_meta, resolve_dtype
from anyquant.loading.plan import plan_layers
from anyquant.quant.detect import detect_format
from anyquant.quant.reference import dequantize
from tests.helpers.errors import rel_err

pytestmark = pytest.mark.slow

WITH_REFERENCE = [
    "llama-bf16-original",
    "llama-awq-gemm-4bit-g128-autoawq",
    "llama-gptq-4bit-g128-sym-gptqmodel",
    "llama-w4a16-g128-gptq-llmc",
    "llama-fp8dynamic-llmc",
]
LMDEPLOY = "llama-w8a8int8-smoothquant-lmdeploy"


def _reference(third_party: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(third_party / name / "reference.safetensors"))


def dequantized_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint with quantized layers replaced by fp32 `prefix.weight`,
    decoded by anyquant's format and dequantized by the spec formula (anyquant.quant.reference)."""
    ckpt = Checkpoint(path)
    fmt = detect_format(ckpt)
    config = ckpt.text_config()
    model = build_on_meta(config)
    plans = plan_layers(
        ckpt, fmt, model, torch.device("cpu"), resolve_dtype("float32", config, torch.device("cpu"))
    )
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for plan in plans:
        if plan.spec is None or fmt is None:
            continue
        names = [n for n in plan.stored.all() if n in ckpt.index]
        weight = fmt.decode(plan.prefix, plan.spec, ckpt.read_many(names))
        state[f"{plan.prefix}.weight"] = dequantize(weight, torch.float32)
        consumed.update(names)
    for name in ckpt.index:
        if name not in consumed:
            state[name] = ckpt.read(name).float()
    return state


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_dequantized_weights_in_transformers_reproduce_reference(third_party: Path, name: str) -> None:
    transformers = pytest.importorskip("transformers")
    path = third_party / name
    ref = _reference(third_party, name)
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config", None)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    missing, unexpected = model.load_state_dict(dequantized_state_dict(path), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    # Activation-quantized schemes: a plain float forward is the weight-only path.
    key = "wonly_last_logits_{}" if "wonly_last_logits_0" in ref else "last_logits_{}"
    for i in range(4):
        with torch.no_grad():
            logits = model(ref[f"prompt_{i}"][None].long()).logits[0, -1]
        assert rel_err(logits, ref[key.format(i)]) < 2e-3, (i, rel_err(logits, ref[key.format(i)]))


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_llm_logits_reproduce_reference(third_party: Path, name: str) -> None:
    ref = _reference(third_party, name)
    llm = LLM(third_party / name, dtype="float32")
    for i in range(4):
        ours = llm.logits(ref[f"prompt_{i}"].tolist())
        theirs = ref[f"logits_{i}"]
        assert rel_err(ours, theirs) <= 2e-2, (i, rel_err(ours, theirs))
        agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
        assert agree >= 0.98, (i, agree)
    out = llm.generate(
        prompt_token_ids=[ref["greedy_prompt"].tolist()],
        sampling_params=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    )[0]
    assert out.token_ids == ref["greedy_tokens"].tolist()


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_reference_kernel_agrees_with_chosen_kernels(third_party: Path, name: str) -> None:
    ref = _reference(third_party, name)
    ids = ref["prompt_3"].tolist()
    fast = LLM(third_party / name, dtype="float32").logits(ids)
    slow = LLM(third_party / name, dtype="float32", kernel="reference").logits(ids)
    assert rel_err(fast, slow) < 5e-3


def test_lmdeploy_smooth_quant_lands_near_its_unquantized_original(third_party: Path) -> None:
    """No CPU reference loader exists for lmdeploy W8A8 (its runtime is CUDA-only): compare with the
    unquantized original. W8A8 int8 on this random model costs a few percent relative L2."""
    ref = _reference(third_party, LMDEPLOY)
    llm = LLM(third_party / LMDEPLOY, dtype="float32")
    for i in range(4):
        last = llm.logits(ref[f"prompt_{i}"].tolist())[-1]
        assert rel_err(last, ref[f"orig_last_logits_{i}"]) < 0.1, (
            i,
            rel_err(last, ref[f"orig_last_logits_{i}"]),
        )
    out = llm.generate(
        prompt_token_ids=[ref["greedy_prompt"].tolist()],
        sampling_params=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    )[0]
    same = sum(a == b for a, b in zip(out.token_ids, ref["orig_greedy_tokens"].tolist()))
    assert same >= 12, (out.token_ids, ref["orig_greedy_tokens"].tolist())
