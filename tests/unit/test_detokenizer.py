"""Incremental detokenization: same text as one full decode, whole UTF-8 characters, stop strings,
and a bounded window of ids per update whatever the length of the output."""

from __future__ import annotations

import pytest

from anyquant.engine.detokenizer import IncrementalDetokenizer
from anyquant.tokenizer import Tokenizer
from anyquant.utils.tiny_model import write_tiny_model

TEXT = "Grüße aus Köln 👋🏽, 東京へ — naïve café. " * 6


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(write_tiny_model(tmp_path_factory.mktemp("tok"), "llama"))


class CountingTokenizer(Tokenizer):
    """Records how many ids every decode call was given."""

    def __init__(self, inner: Tokenizer) -> None:  # wraps a loaded tokenizer
        self.__dict__.update(inner.__dict__)
        self.sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for i in range(1, len(ids) + 1):
        deltas.append(detok.update(ids[:i], finished=i == len(ids)))
        if detok.stopped:
            break
    return deltas


def test_deltas_add_up_to_the_full_decode_and_never_split_a_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)  # byte tokens: multi-byte chars span several
    assert len(ids) > len(TEXT)
    deltas = _stream(IncrementalDetokenizer(tokenizer, []), ids)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_each_update_decodes_a_bounded_window(tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(TEXT * 4, add_special_tokens=False)
    _stream(IncrementalDetokenizer(counting, []), ids)
    # An emoji is 4 byte tokens; windows never grow with the output (about 1,500 ids here).
    assert max(counting.sizes) <= 8


def test_a_truncated_character_is_emitted_when_the_request_finishes(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 👋", add_special_tokens=False)[:-1]  # half an emoji at the end
    deltas = _stream(IncrementalDetokenizer(tokenizer, []), ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1].endswith("\ufffd")


def test_stop_string_truncates_and_is_never_partly_emitted(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two 東京へ three", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ["東京", "never"])
    deltas = _stream(detok, ids)
    assert detok.stopped and detok.text == "one two "
    assert "".join(deltas) == "one two "
    # Held back while "n" could start "never", then released when the next byte ruled it out.
    detok = IncrementalDetokenizer(tokenizer, ["never"])
    text = "".join(_stream(detok, tokenizer.encode("a nap", add_special_tokens=False)))
    assert text == "a nap" and not detok.stopped
