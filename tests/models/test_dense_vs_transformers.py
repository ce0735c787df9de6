"""Each dense family, unquantized and tiny, against the HF transformers implementation in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyquant import LLM, SamplingParams
from anyquant.engine.kv_cache import SequenceCache
from anyquant.utils.tiny_model import write_tiny_model

transformers = pytest.importorskip("transformers")

CASES = {
    "llama": {},
    "llama3-rope": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "llama-tied": {"tie_word_embeddings": True},
}


def _arch(case: str) -> str:
    return case.split("-")[0].replace("llama3", "llama")


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    case = request.param
    path = write_tiny_model(tmp_path_factory.mktemp(case), _arch(case), seed=3, **CASES[case])
    return path, case


def _hf_model(path: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(tiny: tuple[Path, str]) -> None:
    path, _ = tiny
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = LLM(path, dtype="float32").logits(ids)
    with torch.no_grad():
        ref = _hf_model(path)(torch.tensor([ids])).logits[0].float()
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < 1e-5, rel


def test_greedy_generation_matches_transformers(tiny: tuple[Path, str]) -> None:
    path, _ = tiny
    prompt = [256, 72, 101, 108, 108, 111]
    ours = (
        LLM(path, dtype="float32")
        .generate(
            prompt_token_ids=[prompt],
            sampling_params=SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
        )[0]
        .token_ids
    )
    with torch.no_grad():
        hf = (
            _hf_model(path)
            .generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :]
            .tolist()
        )
    assert ours == hf


def test_prefill_equals_token_by_token_decode(tiny: tuple[Path, str]) -> None:
    path, _ = tiny
    llm = LLM(path, dtype="float32")
    ids = list(range(40, 60))
    full = llm.logits(ids)
    seq = SequenceCache(llm.model, len(ids), torch.float32)
    stepwise = torch.stack([seq.forward([tok], pos)[0] for pos, tok in enumerate(ids)])
    assert torch.allclose(full, stepwise, atol=1e-5, rtol=1e-5)
