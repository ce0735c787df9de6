"""Chat templates: where checkpoints keep them, which one a request uses, and rendering them.

Owns finding the templates of a model directory in every layout tools write: transformers 5's
`chat_template.jinja` (plus named ones in `additional_chat_templates/NAME.jinja`), processors'
`chat_template.json`, and `tokenizer_config.json`'s `chat_template` (a string, or a list of named
templates such as `default` and `tool_use`); a user's `--chat-template` overrides them all.
Templates are checkpoint (or client) input, so they render in jinja2's ImmutableSandboxedEnvironment,
with the globals and filters transformers gives them (`raise_exception`, `strftime_now`, a `tojson`
that keeps non-ASCII and `<>&` as they are), so a prompt renders exactly as transformers renders it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from anyquant.errors import CheckpointError

DEFAULT = "default"
TOOL_USE = "tool_use"
# A `--chat-template` value longer than this, or with a newline or `{`, is the template itself.
_MAX_PATH_CHARS = 4096


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as UTF-8 text: {exc}") from exc


def _named(where: str, value: Any) -> dict[str, str]:
    """A `chat_template` field: a string (the default template) or a list of {name, template}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT: value}
    if isinstance(value, list):
        named: dict[str, str] = {}
        for i, entry in enumerate(value):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise CheckpointError(
                    f"{where}: chat_template[{i}] must be an object with string 'name' and 'template'"
                )
            named[entry["name"]] = entry["template"]
        return named
    raise CheckpointError(
        f"{where}: chat_template is {type(value).__name__}; expected a string or a list of "
        "{name, template} objects"
    )


def find_templates(model_dir: Path, tokenizer_config: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """The named templates of a model directory and the file they came from. transformers' order:
    a template file beats the tokenizer config's field (transformers 5 writes the file and drops
    the field; older checkpoints only have the field)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        templates = {DEFAULT: _read_text(jinja_file)}
        extra_dir = model_dir / "additional_chat_templates"
        if extra_dir.is_dir():
            for extra in sorted(extra_dir.glob("*.jinja")):
                templates[extra.stem] = _read_text(extra)
        return templates, jinja_file.name
    json_file = model_dir / "chat_template.json"
    if json_file.is_file():
        value = _read_json(json_file)
        if not isinstance(value, dict) or "chat_template" not in value:
            raise CheckpointError(f"{json_file}: expected an object with a 'chat_template' field")
        return _named(str(json_file), value["chat_template"]), json_file.name
    templates = _named(str(model_dir / "tokenizer_config.json"), tokenizer_config.get("chat_template"))
    return templates, "tokenizer_config.json" if templates else None


def config_templates(source: str, tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """The named templates of a tokenizer config alone (a GGUF file's `tokenizer.chat_template`)."""
    return _named(source, tokenizer_config.get("chat_template"))


def load_override(value: str) -> str:
    """`--chat-template` / `LLM(chat_template=...)`: a file holding the template, or the template
    itself (as vLLM accepts both)."""
    looks_inline = len(value) > _MAX_PATH_CHARS or "\n" in value or "{" in value
    if not looks_inline:
        path = Path(value)
        if path.is_file():
            return _read_text(path)
        raise CheckpointError(f"chat template file {value!r} does not exist")
    return value


def select(templates: dict[str, str], tools: bool, name: str | None = None) -> str | None:
    """transformers' choice among named templates: the one asked for, else `tool_use` when the
    request has tools and the checkpoint has one, else `default` (or the only one there is)."""
    if name is not None:
        if name not in templates:
            raise CheckpointError(f"no chat template named {name!r}; this model has {sorted(templates)}")
        return templates[name]
    if tools and TOOL_USE in templates:
        return templates[TOOL_USE]
    if DEFAULT in templates:
        return templates[DEFAULT]
    if len(templates) == 1:
        return next(iter(templates.values()))
    if templates:
        raise CheckpointError(
            f"this model has several chat templates {sorted(templates)} and none is named 'default'"
        )
    return None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; templates are written against
    # transformers' version, which leaves them (and non-ASCII text) alone.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise_template_error(message: str) -> None:
    raise CheckpointError(f"chat template error: {message}")


def render(template: str, source: str, **variables: Any) -> str:
    """Render `template` in the sandbox; any failure is a CheckpointError naming `source`."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template).render(**variables)
    except jinja2.TemplateError as exc:  # SecurityError (sandbox) is a TemplateError too
        raise CheckpointError(f"{source} chat_template failed: {type(exc).__name__}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # e.g. tojson of a non-JSON value
        raise CheckpointError(f"{source} chat_template failed: {type(exc).__name__}: {exc}") from exc
