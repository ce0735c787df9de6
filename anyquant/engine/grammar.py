"""Compiling what guided decoding asks for (`GuidedDecodingParams`) into xgrammar grammars.

Owns the one xgrammar view of the model's vocabulary (built once per engine, on first use), the
translation of each kind of constraint (JSON schema, any JSON object, regex, choice, EBNF or Lark
grammar) into a compiled grammar, a bounded cache of compiled grammars keyed by the constraint's
text, and turning the grammar engine's complaints into `GuidedDecodingError` (a ValueError: the
server answers it with 400). xgrammar is imported here only, and only when a request first asks
for guided decoding, so `import anyquant` stays light. Per-request matching lives in guided.py.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from anyquant.engine.sampling import GuidedDecodingParams

if TYPE_CHECKING:
    from anyquant.tokenizer import Tokenizer

# JSON answers are written compactly, as json.dumps does (", " and ": " between items): a grammar
# that allows any whitespace lets a weak or unlucky model emit blank lines until max_tokens, and
# the answer never parses (a known failure mode of unbounded-whitespace JSON grammars).
JSON_ANY_WHITESPACE = False
# Compiled grammars kept per engine; a schema sent with every request compiles once.
GRAMMAR_CACHE_SIZE = 256
# A constraint's text longer than this is refused before compiling (a schema is rarely > 100 kB).
MAX_CONSTRAINT_CHARS = 1 << 20
# A Lark grammar (vLLM accepts both syntaxes in guided_grammar) defines `start:`; EBNF uses `::=`.
_LARK_START = re.compile(r"^\s*[?!]?start\s*:", re.MULTILINE)


class GuidedDecodingError(ValueError):
    """The constraint cannot be compiled: names the field (json, regex, choice, grammar) and why."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint. `allowed` (a packed bitmask row, or None) is ANDed into every mask of
    the grammar: tokens it clears are never allowed, whatever the grammar engine says."""

    compiled: Any  # xgrammar.CompiledGrammar
    allowed: Tensor | None = None


def constraint_key(params: GuidedDecodingParams) -> tuple[str, str]:
    """(kind, text): what identifies a compiled grammar. A JSON schema given as a dict and as the
    same JSON text share one key (key order kept: it decides the order of the output's fields)."""
    if params.json is not None:
        if isinstance(params.json, str):
            text = params.json
        else:
            try:
                text = json.dumps(params.json, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise GuidedDecodingError(f"json: the schema is not JSON-serializable: {exc}") from exc
        return "json", text
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        if not params.choice or not all(isinstance(c, str) for c in params.choice):
            raise GuidedDecodingError("choice: expected a non-empty list of strings")
        return "choice", json.dumps(params.choice, ensure_ascii=False)
    if params.grammar is not None:
        return "grammar", params.grammar
    return "json_object", ""


def choice_grammar(choices: list[str]) -> str:
    """EBNF with one literal alternative per choice. json.dumps writes each string as a quoted
    literal with the escapes (\\" \\\\ \\n \\uXXXX) the EBNF reader takes."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles constraints against one tokenizer; thread-safe (the server compiles on worker
    threads while the engine thread matches)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: the width of its logits and of the masks
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._no_control_chars: Tensor | None = None
        self.num_compiled = 0  # grammars compiled (cache misses), for tests and metrics

    def compile(self, params: GuidedDecodingParams) -> Grammar:
        """The compiled grammar for `params`, from the cache when seen before."""
        key = constraint_key(params)
        if len(key[1]) > MAX_CONSTRAINT_CHARS:
            raise GuidedDecodingError(f"{key[0]}: {len(key[1])} characters; at most {MAX_CONSTRAINT_CHARS}")
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            compiler = self._xgrammar_compiler()
        compiled = self._compile(compiler, *key)
        _check_not_empty(compiled, key[0])
        # JSON never holds a raw control character (strings escape them, and the compact layout
        # puts only spaces between items), but xgrammar 0.2.9 lets them into strings that have a
        # minLength or maxLength; json.loads and JSON.parse would then refuse the answer.
        grammar = Grammar(
            compiled, self._control_free(compiled) if key[0] in ("json", "json_object") else None
        )
        with self._lock:
            self.num_compiled += 1
            self._cache[key] = grammar
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _control_free(self, compiled: Any) -> Tensor:
        """The bitmask row allowing every token whose text holds no byte below 0x20."""
        if self._no_control_chars is None:
            texts = compiled.tokenizer_info.decoded_vocab
            ok = torch.ones(self.vocab_size, dtype=torch.bool)
            for token_id, text in enumerate(texts[: self.vocab_size]):
                if any(byte < 0x20 for byte in text):
                    ok[token_id] = False
            self._no_control_chars = pack_bits(ok)
        return self._no_control_chars

    def _compile(self, compiler: Any, kind: str, text: str) -> Any:
        try:
            if kind == "json":
                return compiler.compile_json_schema(text, any_whitespace=JSON_ANY_WHITESPACE)
            if kind == "json_object":
                # Any object (not any value, as OpenAI's json_object promises), extra keys allowed.
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=JSON_ANY_WHITESPACE, strict_mode=False
                )
            if kind == "regex":
                return compiler.compile_regex(text)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(json.loads(text)))
            if _LARK_START.search(text) and "::=" not in text:
                return compiler.compile_lark(text)
            return compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GuidedDecodingError(f"{_field(kind)}: {_reason(exc)}") from exc

    def _xgrammar_compiler(self) -> Any:
        """Built on first use (called under the lock): the vocabulary view takes a moment for a
        150k-token vocabulary, and most engines never see a guided request."""
        if self._compiler is None:
            if self._tokenizer is None:
                raise GuidedDecodingError(
                    "guided decoding needs the model's tokenizer (tokenizer.json), which this model lacks"
                )
            try:
                import xgrammar
            except ImportError as exc:
                raise GuidedDecodingError(
                    "guided decoding needs xgrammar: pip install 'anyquant[structured]'"
                ) from exc
            info = tokenizer_info(self._tokenizer, self.vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return self._compiler


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """xgrammar's view of the vocabulary: each id's text, how texts are encoded (byte-level,
    byte-fallback, raw: read by xgrammar from tokenizer.json's decoder) and the stop tokens.

    Special tokens (<s>, <pad>, chat markers flagged special) get an empty text, which xgrammar
    never allows: their literal text ("<s>") would otherwise match inside a JSON string, and the
    detokenizer, which drops special tokens, would then print a string the grammar never saw."""
    import xgrammar

    backend = tokenizer.backend
    # The detection xgrammar's from_huggingface runs on the same tokenizer.json text, without
    # building a transformers tokenizer around it first (seconds for a 150k vocabulary).
    detected = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
    encoded = [""] * vocab_size
    for text, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size and token_id not in special:
            encoded[token_id] = text
    return xgrammar.TokenizerInfo(
        encoded,
        detected["vocab_type"],
        vocab_size=vocab_size,
        # None: xgrammar recognises the usual end tokens itself (a model config without eos)
        stop_token_ids=sorted(tokenizer.eos_token_ids) or None,
        add_prefix_space=bool(detected["add_prefix_space"]),
    )


def pack_bits(allowed: Tensor) -> Tensor:
    """bool [vocab] -> int32 [ceil(vocab / 32)], token 32 * w + b at bit b of word w (xgrammar's
    bitmask layout)."""
    words = -(-allowed.numel() // 32)
    padded = torch.zeros(words * 32, dtype=torch.int64)
    padded[: allowed.numel()] = allowed.long()
    packed = (padded.view(words, 32) << torch.arange(32)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _check_not_empty(compiled: Any, kind: str) -> None:
    """Refuse a grammar that matches nothing (`root ::= root`, `{"anyOf": []}`): its first mask
    would allow no token at all, not even EOS, and the request could only fail mid-generation."""
    import xgrammar

    mask = xgrammar.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    xgrammar.GrammarMatcher(compiled).fill_next_token_bitmask(mask)
    if not bool(mask.any()):
        raise GuidedDecodingError(
            f"{_field(kind)}: matches no output at all (no token, not even the end, is allowed first)"
        )


def _field(kind: str) -> str:
    return {"json": "json schema", "json_object": "json_object", "choice": "choice"}.get(kind, kind)


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location ("[time] file.cc:94: ...")."""
    text = str(exc).strip()
    text = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)
    text = re.sub(r"Check failed: \(.*?\) is false:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__
