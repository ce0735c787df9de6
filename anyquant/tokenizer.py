"""Tokenizer from tokenizer.json (the `tokenizers` library) and chat templates in a Jinja sandbox.

Owns text <-> ids, the special-token ids generation stops on, and chat-template rendering. The
template runs in jinja2's ImmutableSandboxedEnvironment: it comes from the checkpoint, so it is
untrusted input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anyquant.config_fields import as_int
from anyquant.errors import CheckpointError


def _read_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return value


def _chat_template(path: Path, value: Any) -> str | None:
    """The template string; some tokenizers list named templates, of which "default" is the chat one."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path}: chat_template is {type(value).__name__}; expected a string")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(model_dir)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (anyquant reads tokenizers from tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot be read by the tokenizers library: {exc}") from exc
        cfg_file = path / "tokenizer_config.json"
        self._setup(tok, _read_object(cfg_file) if cfg_file.is_file() else {}, cfg_file, config)

    @classmethod
    def from_gguf(
        cls, metadata: dict[str, Any], path: Path, config: dict[str, Any] | None = None
    ) -> Tokenizer:
        """The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (no other files)."""
        from anyquant.gguf_tokenizer import build_gguf_tokenizer

        built = build_gguf_tokenizer(metadata, str(path))
        self = cls.__new__(cls)
        self._setup(built.tokenizer, built.config, path, config)
        return self

    def _setup(
        self, tok: Any, tok_config: dict[str, Any], cfg_file: Path, config: dict[str, Any] | None
    ) -> None:
        self._tok = tok
        self.config: dict[str, Any] = tok_config
        model_cfg = config or {}
        self.bos_token_id = self._special_id("bos_token", model_cfg.get("bos_token_id"))
        self.eos_token_ids = self._eos_ids(model_cfg)
        self.chat_template: str | None = _chat_template(cfg_file, self.config.get("chat_template"))

    def _token_text(self, key: str) -> str | None:
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    def _special_id(self, key: str, fallback: Any) -> int | None:
        text = self._token_text(key)
        if text is not None:
            tid = self._tok.token_to_id(text)
            if tid is not None:
                return int(tid)
        if fallback is None:
            return None
        tid = as_int(fallback)
        if tid is None or not 0 <= tid < self.vocab_size:
            raise CheckpointError(
                f"config.json: field '{key}_id' = {fallback!r:.80}; expected a token id of the "
                f"tokenizer (0..{self.vocab_size - 1})"
            )
        return tid

    def _eos_ids(self, model_cfg: dict[str, Any]) -> set[int]:
        eos = model_cfg.get("eos_token_id")
        listed = eos if isinstance(eos, list) else [] if eos is None else [eos]
        ids: set[int] = set()
        for entry in listed:
            tid = as_int(entry)
            if tid is None or tid < 0:
                raise CheckpointError(
                    f"config.json: field 'eos_token_id' = {eos!r:.80}; expected a token id or a list of them"
                )
            ids.add(tid)
        tid = self._special_id("eos_token", None)
        if tid is not None:
            ids.add(tid)
        return ids

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise CheckpointError("tokenizer_config.json has no chat_template; send a plain prompt instead")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text("bos_token") or "",
                eos_token=self._token_text("eos_token") or "",
            )
        except jinja2.TemplateError as exc:  # SecurityError (sandbox) is a TemplateError too
            raise CheckpointError(
                f"tokenizer_config.json chat_template failed: {type(exc).__name__}: {exc}"
            ) from exc


def _raise_template_error(message: str) -> None:
    raise CheckpointError(f"chat template error: {message}")
