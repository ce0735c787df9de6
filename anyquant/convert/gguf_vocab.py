"""A transformers tokenizer.json (byte-level BPE) as GGUF `tokenizer.ggml.*` metadata.

The inverse of anyquant/gguf_tokenizer.py for the vocabularies it reads back as `gpt2`: tokens
by id, merges, token types (special added tokens are control pieces, other added tokens
user-defined), the pre-tokenizer by the name whose split regex the file uses, BOS / EOS and the
chat template. SentencePiece vocabularies need the scores of a tokenizer.model, which
tokenizer.json does not keep: refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anyquant.errors import UnsupportedError
from anyquant.gguf_tokenizer import PRE_TOKENIZERS

# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_PREFERRED_NAMES = ("qwen2", "llama-bpe", "gpt-2")  # the names llama.cpp's converter writes


@dataclass(frozen=True)
class GgufVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None


def _pre_name(pre: Any, source: str) -> str:
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" not in kinds:
        raise UnsupportedError(
            f"{source}: only byte-level BPE tokenizers are written to GGUF (this one's pre-tokenizer "
            f"is {kinds or pre!r}); SentencePiece vocabularies need the scores of a tokenizer.model"
        )
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if not regexes:
        byte_level = steps[kinds.index("ByteLevel")]
        if byte_level.get("use_regex", True):
            return "gpt-2"
    for name in (*_PREFERRED_NAMES, *PRE_TOKENIZERS):
        if regexes and PRE_TOKENIZERS.get(name) == regexes[0]:
            return name
    raise UnsupportedError(f"{source}: its pre-tokenizer split {regexes[:1]!r:.120} has no llama.cpp name")


def gguf_vocab(tokenizer: dict[str, Any], tok_config: dict[str, Any], source: str) -> GgufVocab:
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedError(
            f"{source}: tokenizer model {model.get('type')!r}; GGUF output writes byte-level BPE"
        )
    pre = _pre_name(tokenizer.get("pre_tokenizer"), source)
    by_id: dict[int, tuple[str, int]] = {int(i): (t, _NORMAL) for t, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"], _CONTROL if added.get("special") else _USER_DEFINED)
    size = max(by_id) + 1
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise UnsupportedError(
            f"{source}: token ids {missing[:5]} have no token (GGUF needs a dense vocabulary)"
        )
    tokens = [by_id[i][0] for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens)}

    def token_id(key: str) -> int | None:
        value = tok_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return ids.get(value) if isinstance(value, str) else None

    bos = token_id("bos_token")
    post = str(tokenizer.get("post_processor"))
    add_bos = bos is not None and "TemplateProcessing" in post and f"'{tokens[bos]}'" in post
    template = tok_config.get("chat_template")
    return GgufVocab(
        tokens, [by_id[i][1] for i in range(size)], merges, pre, bos, token_id("eos_token"), add_bos,
        template if isinstance(template, str) else None,
    )  # fmt: skip
