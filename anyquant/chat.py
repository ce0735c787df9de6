"""OpenAI-style chat messages and tools -> the variables a checkpoint's chat template expects.

Owns the one translation `LLM.chat` and the server's /v1/chat/completions share, so that the same
request renders to the same prompt in both: content parts joined into text, assistant `tool_calls`
with their JSON `arguments` string parsed into an object (templates `tojson` them; a string would
be quoted twice, as transformers and vLLM also avoid), `tool` messages kept with their
`tool_call_id`, and the tools list passed as OpenAI's function definitions.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anyquant.tokenizer import Tokenizer


# Template variables a request sets through their own fields, never through chat_template_kwargs.
_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "chat_template"})


class ChatInputError(ValueError):
    """A message or tool that cannot be rendered; the text names the field."""


# Image content parts: OpenAI's URL form, and vLLM's offline-only PIL form (`LLM.chat`).
SERVER_IMAGE_PARTS = ("image_url",)
OFFLINE_IMAGE_PARTS = ("image_url", "image_pil")


def content_text(
    content: Any, where: str, image_parts: tuple[str, ...] = SERVER_IMAGE_PARTS
) -> str | list[dict[str, str]]:
    """A message's content as a chat template takes it: one string when it is all text, else the
    parts in order, text ones as {"type": "text", "text"} and images as {"type": "image"} (the
    images themselves travel beside the prompt: engine/multimodal.py)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ChatInputError(f"{where}.content must be a string or a list of parts")
    parts: list[dict[str, str]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in image_parts:
            parts.append({"type": "image"})
        else:
            raise ChatInputError(
                f"{where}.content[{i}] has type {kind!r}; supported: text parts "
                '({"type": "text", "text": "..."}) and image parts ({"type": "image_url", '
                '"image_url": {"url": "data:image/png;base64,..."}})'
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def image_parts_of(
    messages: list[dict[str, Any]], kinds: tuple[str, ...] = OFFLINE_IMAGE_PARTS
) -> list[tuple[str, dict[str, Any]]]:
    """(where, part) of every image part of the messages, in order."""
    found = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in kinds:
                    found.append((f"messages[{i}].content[{j}]", part))
    return found


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ChatInputError(f"{where} must be an object with a 'function' object")
    function = call["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ChatInputError(f"{where}.function.name must be a non-empty string")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ChatInputError(f"{where}.function.arguments is not valid JSON: {exc}") from exc
    out: dict[str, Any] = {
        "type": call.get("type", "function"),
        "function": {"name": name, "arguments": arguments},
    }
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def template_messages(
    messages: list[dict[str, Any]], image_parts: tuple[str, ...] = SERVER_IMAGE_PARTS
) -> list[dict[str, Any]]:
    """Normalise OpenAI messages for a template; raises ChatInputError naming the bad field."""
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatInputError(f"{where} must be an object with a string 'role'")
        rendered: dict[str, Any] = {
            "role": message["role"],
            "content": content_text(message.get("content"), where, image_parts),
        }
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                rendered[key] = message[key]
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise ChatInputError(f"{where}.tool_calls must be a list")
            rendered["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(rendered)
    return out


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI function tools, checked: each {"type": "function", "function": {"name", ...}}."""
    if tools is None:
        return None
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function, dict)
        ):
            raise ChatInputError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ChatInputError(f"tools[{i}].function.name must be a non-empty string")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ChatInputError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    continue_final_message: bool = False,
    image_parts: tuple[str, ...] = SERVER_IMAGE_PARTS,
) -> str:
    """The prompt text of a chat request (ChatInputError for bad input, CheckpointError when the
    template fails). `continue_final_message`: end the prompt right after the last message's
    content, so the model continues that message (transformers' rule), instead of starting a new
    turn."""
    kwargs = dict(template_kwargs or {})
    reserved = sorted(set(kwargs) & _RESERVED)
    if reserved:
        raise ChatInputError(f"chat_template_kwargs must not set {reserved}; they have fields of their own")
    if continue_final_message and add_generation_prompt:
        raise ChatInputError("continue_final_message and add_generation_prompt cannot both be true")
    rendered = template_messages(messages, image_parts)
    text = tokenizer.apply_chat_template(
        rendered,
        add_generation_prompt=add_generation_prompt,
        tools=check_tools(tools),
        chat_template=chat_template,
        **kwargs,
    )
    if not continue_final_message:
        return text
    final = rendered[-1]["content"] if rendered else ""
    if isinstance(final, list):  # text after an image: continue from its last text part
        final = next((p["text"] for p in reversed(final) if p["type"] == "text"), "")
    for piece in (final, final.strip()):
        if piece and piece in text:
            return text[: text.rindex(piece) + len(piece)]
    raise ChatInputError(
        "continue_final_message: the last message's content does not appear in the rendered prompt"
    )
