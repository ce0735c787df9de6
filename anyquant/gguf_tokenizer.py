"""A `tokenizers` Tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.

Owns the two vocabularies llama.cpp writes: `llama` (SentencePiece: pieces with scores and token
types, "▁" for spaces, byte-fallback pieces <0x00>..<0xFF>) and `gpt2` (byte-level BPE: vocab,
merges and a pre-tokenizer named by `tokenizer.ggml.pre`). Both become the same `tokenizers`
objects a transformers tokenizer.json describes, so encoding and decoding are that library's.
An unknown tokenizer model or pre-tokenizer name is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anyquant.errors import CheckpointError, UnsupportedError

# llama.cpp token types (llama_token_type): which pieces are special.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE (the published
# tokenizer.json pre-tokenizers of those model families).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str] = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
# Families whose BPE takes a whole-word vocab hit before merging (tokenizer.json "ignore_merges").
_IGNORE_MERGES = frozenset(("llama-bpe", "llama3"))


@dataclass(frozen=True)
class GgufTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    config: dict[str, Any]  # tokenizer_config.json-like: bos_token, eos_token, chat_template


def _get(meta: dict[str, Any], key: str, kind: type, source: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise CheckpointError(f"{source}: metadata key {key!r} = {value!r:.80}; expected {kind.__name__}")
    return value


def build_gguf_tokenizer(meta: dict[str, Any], source: str) -> GgufTokenizer:
    model = _get(meta, "tokenizer.ggml.model", str, source)
    if model is None:
        raise CheckpointError(f"{source}: no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
    tokens = _get(meta, "tokenizer.ggml.tokens", list, source)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(
            f"{source}: metadata 'tokenizer.ggml.tokens' must be a non-empty list of strings"
        )
    types = _get(meta, "tokenizer.ggml.token_type", list, source) or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{source}: 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens"
        )
    if model == "llama":
        tok = _sentencepiece(meta, tokens, types, source)
    elif model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, source)
    else:
        raise UnsupportedError(
            f"{source}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; supported: llama, gpt2"
        )
    _add_special_tokens(tok, tokens, types)
    config: dict[str, Any] = {}
    for field in ("bos", "eos"):
        tid = _get(meta, f"tokenizer.ggml.{field}_token_id", int, source)
        if tid is not None and 0 <= tid < len(tokens):
            config[f"{field}_token"] = tokens[tid]
    template = _get(meta, "tokenizer.chat_template", str, source)
    if template is not None:
        config["chat_template"] = template
    _post_processor(tok, meta, tokens, model, source)
    return GgufTokenizer(tok, config)


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int], source: str) -> Any:
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    scores = _get(meta, "tokenizer.ggml.scores", list, source) or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise CheckpointError(
            f"{source}: 'tokenizer.ggml.scores' has {len(scores)} entries for {len(tokens)} tokens"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = _get(meta, "tokenizer.ggml.unknown_token_id", int, source, 0)
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=_merges_from_scores(tokens, scores, types),
            unk_token=tokens[unk],
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps: list[Any] = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose union is the highest-scoring piece; as BPE
    merges: every split of a normal piece into two pieces of the vocabulary, ranked by the score
    of the piece they form (then by the ids of the parts, for a deterministic order)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _USER_DEFINED)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[pid]), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], source: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    pre = _get(meta, "tokenizer.ggml.pre", str, source, "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedError(
            f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    # No merges: every token is a byte or a special token (llama.cpp's converter writes none for a
    # byte-level vocabulary without merges, as tiny test models have).
    merges_raw = _get(meta, "tokenizer.ggml.merges", list, source, [])
    merges = []
    for entry in merges_raw:
        parts = entry.split(" ") if isinstance(entry, str) else []
        if len(parts) != 2:
            raise CheckpointError(f"{source}: merge {entry!r:.60} is not two pieces separated by a space")
        merges.append((parts[0], parts[1]))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control and unknown pieces are special (matched whole in text, skipped when decoding with
    skip_special_tokens); user-defined pieces are matched whole but decoded as text."""
    from tokenizers import AddedToken

    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k in (_CONTROL, _UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _post_processor(tok: Any, meta: dict[str, Any], tokens: list[str], model: str, source: str) -> None:
    """BOS / EOS added around every encoded text as the file says (llama.cpp's add_bos_token /
    add_eos_token; SentencePiece vocabularies add BOS unless told otherwise)."""
    from tokenizers import processors

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    ends: dict[str, tuple[str, int]] = {}
    for flag, field in ((add_bos, "bos"), (add_eos, "eos")):
        tid = meta.get(f"tokenizer.ggml.{field}_token_id")
        if not flag:
            continue
        if not isinstance(tid, int) or not 0 <= tid < len(tokens):
            raise CheckpointError(
                f"{source}: add_{field}_token is set but tokenizer.ggml.{field}_token_id is {tid!r}"
            )
        ends[field] = (tokens[tid], tid)
    bos = [ends["bos"][0]] if "bos" in ends else []
    eos = [ends["eos"][0]] if "eos" in ends else []
    single = " ".join([*bos, "$A", *eos])
    pair = " ".join([*bos, "$A", *eos, *bos, "$B", *eos])
    steps: list[Any] = []
    if model == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    if ends:
        steps.append(
            processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=list(dict.fromkeys(ends.values()))
            )
        )
    if steps:
        tok.post_processor = processors.Sequence(steps)
