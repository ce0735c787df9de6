"""Tokenizer from tokenizer.json (the `tokenizers` library) and chat templates in a Jinja sandbox.

Owns text <-> ids, the special-token ids generation stops on, and the model's chat templates
(found and rendered by chat_template.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anyquant.chat_template import (
    DEFAULT,
    config_templates,
    find_templates,
    load_override,
    render,
    select,
)
from anyquant.config_fields import as_int, read_json_object
from anyquant.errors import CheckpointError


class Tokenizer:
    def __init__(
        self, model_dir: str | Path, config: dict[str, Any] | None = None, chat_template: str | None = None
    ) -> None:
        """`chat_template`: a template file or the template itself, used instead of the model's."""
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
        self._setup(tok, read_json_object(cfg_file) if cfg_file.is_file() else {}, config, chat_template)
        if chat_template is None:
            self.chat_templates, found = find_templates(path, self.config)
            self.chat_template_source = found or "tokenizer_config.json"

    @classmethod
    def from_gguf(
        cls,
        metadata: dict[str, Any],
        path: Path,
        config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (no other files),
        its chat template included (`chat_template` replaces it)."""
        from anyquant.gguf_tokenizer import build_gguf_tokenizer

        built = build_gguf_tokenizer(metadata, str(path))
        self = cls.__new__(cls)
        self._setup(built.tokenizer, built.config, config, chat_template)
        if chat_template is None:
            self.chat_templates = config_templates(f"{path}: tokenizer.chat_template", self.config)
            self.chat_template_source = path.name
        return self

    def _setup(
        self,
        tok: Any,
        tok_config: dict[str, Any],
        config: dict[str, Any] | None,
        chat_template: str | None,
    ) -> None:
        """What both sources share; without an override the caller finds the model's templates."""
        self._tok = tok
        self.config: dict[str, Any] = tok_config
        model_cfg = config or {}
        self.bos_token_id = self._special_id("bos_token", model_cfg.get("bos_token_id"))
        self.eos_token_ids = self._eos_ids(model_cfg)
        if chat_template is not None:
            self.chat_templates = {DEFAULT: load_override(chat_template)}
            self.chat_template_source = "the given chat template"

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
    def backend(self) -> Any:
        """The `tokenizers.Tokenizer` read from tokenizer.json (for grammar engines that need the vocabulary)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    @property
    def chat_template(self) -> str | None:
        """The template used for requests without tools (None: the model has none)."""
        return select(self.chat_templates, tools=False) if self.chat_templates else None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` (and `tools`, OpenAI's function definitions) with the model's template,
        or with `chat_template` (a template string) when given; `kwargs` reach the template as
        variables (e.g. enable_thinking), as transformers passes them."""
        template = chat_template or select(self.chat_templates, tools=bool(tools))
        if not template:
            raise CheckpointError(
                "this model has no chat template (looked for chat_template.jinja, chat_template.json "
                "and tokenizer_config.json's chat_template); send a plain prompt or pass a chat template"
            )
        variables = {
            **kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._token_text("bos_token") or "",
            "eos_token": self._token_text("eos_token") or "",
        }
        if tools is not None:
            variables["tools"] = tools
        source = "the request's" if chat_template else self.chat_template_source
        return render(template, source, **variables)
