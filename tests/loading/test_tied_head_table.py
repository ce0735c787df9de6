"""A tied embedding table held once: where the bf16 LM head runs on `cpu_avx512_lm_head`, token
lookups read the head kernel's packed words (`HeadEmbedding`) and the table's own copy is dropped.
The rows must be the checkpoint's table exactly, and the logits those of a model that keeps both
copies (eager and compiled steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from anyquant import LLM, SamplingParams
from anyquant.layers.embedding import HeadEmbedding
from anyquant.models.base import DecoderLM
from anyquant.utils.tiny_model import write_tiny_model

IDS = [5, 99, 300, 17, 4, 1000, 2039, 0, 16, 15]


def _tiny(tmp_path: Path, tied: bool) -> Path:
    # vocab 2040: not a multiple of the kernel's 16-row blocks, so the last block is padded.
    return write_tiny_model(
        tmp_path, "llama", seed=7, hidden_size=136, head_dim=34, vocab_size=2040, tie_word_embeddings=tied
    )


def _kept_apart(path: Path, **kw: object) -> LLM:
    """The same model with the table kept as its own copy (the behaviour before sharing)."""
    original = DecoderLM.embed_from_head
    try:
        DecoderLM.embed_from_head = lambda self: False  # type: ignore[method-assign]
        return LLM(path, dtype="bfloat16", **kw)  # type: ignore[arg-type]
    finally:
        DecoderLM.embed_from_head = original  # type: ignore[method-assign]


def test_tied_table_is_read_from_the_head(tmp_path: Path) -> None:
    path = _tiny(tmp_path, tied=True)
    llm = LLM(path, dtype="bfloat16", enforce_eager=True)
    model = llm.loaded.model
    assert isinstance(model, DecoderLM)
    if model.lm_head.kernel.name not in ("cpu_avx512_lm_head", "cpu_avx2_lm_head"):
        pytest.skip("neither the AVX-512 nor the AVX2 LM head runs on this CPU")
    embedding = model.body.embed_tokens
    assert isinstance(embedding, HeadEmbedding)
    assert not any(p.numel() for p in embedding.parameters())  # no copy of its own
    table = llm.loaded.checkpoint.read("model.embed_tokens.weight").to(torch.bfloat16)
    ids = torch.arange(table.shape[0])
    assert torch.equal(embedding(ids), table)
    assert torch.equal(
        embedding(torch.tensor([[3, 2039], [16, 0]])), table[torch.tensor([[3, 2039], [16, 0]])]
    )

    apart = _kept_apart(path, enforce_eager=True)
    assert type(apart.loaded.model.body.embed_tokens) is nn.Embedding
    assert torch.equal(llm.logits(IDS), apart.logits(IDS))


@pytest.mark.slow
def test_compiled_step_reads_the_shared_table(tmp_path: Path) -> None:
    path = _tiny(tmp_path, tied=True)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    shared = LLM(path, dtype="bfloat16", max_model_len=64, max_num_seqs=2, enforce_eager=True)
    if not isinstance(shared.loaded.model.body.embed_tokens, HeadEmbedding):
        pytest.skip("the AVX-512 LM head does not run on this CPU")
    # Dynamo's whole-step trace (fullgraph: a graph break is an error) without Inductor's build.
    assert shared.engine.runner.capture(63, 2, backend="aot_eager") is None
    apart = _kept_apart(path, enforce_eager=True)
    prompts = [[5, 99, 300, 17], [2039, 4, 1000]]
    got = shared.generate(prompt_token_ids=prompts, sampling_params=params)
    want = apart.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert shared.engine.runner.captured is not None and shared.engine.runner.captured.steps_run > 0


@pytest.mark.parametrize("case", ["untied", "int8 head", "float32"])
def test_table_kept_where_the_head_cannot_serve_it(tmp_path: Path, case: str) -> None:
    path = _tiny(tmp_path, tied=case != "untied")
    kw: dict[str, object] = {"enforce_eager": True}
    if case == "int8 head":
        kw["lm_head_dtype"] = "int8"  # the head's values are no longer the table's
    llm = LLM(path, dtype="float32" if case == "float32" else "bfloat16", **kw)  # type: ignore[arg-type]
    assert type(llm.loaded.model.body.embed_tokens) is nn.Embedding
