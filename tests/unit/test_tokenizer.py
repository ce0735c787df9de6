"""Tokenizer and chat templates: the template is checkpoint input, rendered in a sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyquant.errors import CheckpointError
from anyquant.tokenizer import Tokenizer
from anyquant.utils.tiny_model import write_tiny_model

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _with_template(path: Path, template: str) -> Tokenizer:
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(path, json.loads((path / "config.json").read_text()))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "m", "llama")


def test_round_trip_and_special_ids(tiny: Path) -> None:
    tok = Tokenizer(tiny, json.loads((tiny / "config.json").read_text()))
    ids = tok.encode("héllo wörld")
    assert ids[0] == tok.bos_token_id == 256
    assert tok.decode(ids) == "héllo wörld"
    assert 257 in tok.eos_token_ids


def test_chat_template_renders(tiny: Path) -> None:
    tok = _with_template(tiny, TEMPLATE)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi\n<|assistant|>"


def test_chat_template_sandbox_blocks_python_internals(tiny: Path) -> None:
    tok = _with_template(tiny, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(CheckpointError, match="chat_template failed: SecurityError"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_raise_exception(tiny: Path) -> None:
    tok = _with_template(tiny, "{{ raise_exception('only user and assistant roles are supported') }}")
    with pytest.raises(CheckpointError, match="only user and assistant roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_template_is_a_clear_error(tiny: Path) -> None:
    tok = Tokenizer(tiny)
    with pytest.raises(CheckpointError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        Tokenizer(tmp_path)
