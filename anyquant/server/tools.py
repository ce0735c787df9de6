"""Tool calling for /v1/chat/completions: `tools` and `tool_choice` -> how the output is decoded
and parsed, and the parsed output -> the assistant message OpenAI clients expect.

Owns the rules of `tool_choice` (`none`, `auto`, `required`, a named function; `auto` needs the
server's `--tool-call-parser`) and what makes `required` and named choices always parse: with a
parser, its own wrapper (e.g. Hermes `<tool_call>...</tool_call>`) around the JSON schema of the
allowed calls, written as EBNF for the structured-output engine (`guided_decoding.grammar`);
without one, vLLM's bare JSON (`guided_decoding.json`): a list of calls, or a named function's
arguments.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from anyquant.chat import ChatInputError, check_tools
from anyquant.engine.sampling import GuidedDecodingParams
from anyquant.server.tool_parsers import (
    BareJsonParser,
    Function,
    ToolCall,
    ToolCallStream,
    ToolParser,
    get_parser,
    parse,
)

_RULE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*::=", re.MULTILINE)
# EBNF pieces a rename must not touch: string literals and character classes.
_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ToolChoiceError(ValueError):
    """A request whose tools / tool_choice cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def json_schema_rules(rule: str, schema: dict[str, Any]) -> str:
    """EBNF rules defining `rule` as JSON matching `schema` (compact, as models write it), with
    every helper rule prefixed by `rule` so several schemas can share one grammar."""
    import xgrammar

    text = str(xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
    names = set(_RULE.findall(text))

    def rename(code: str) -> str:
        return _IDENT.sub(
            lambda m: (rule if m[0] == "root" else f"{rule}__{m[0]}") if m[0] in names else m[0], code
        )

    out, last = [], 0
    for literal in _LITERAL.finditer(text):
        out += [rename(text[last : literal.start()]), literal[0]]
        last = literal.end()
    out.append(rename(text[last:]))
    return "".join(out)


@dataclass(frozen=True)
class ToolPlan:
    """How one request's output is decoded and read."""

    parser: ToolParser | None  # None: the output is plain content
    guided: GuidedDecodingParams | None  # set for `required` and named choices
    tools: list[dict[str, Any]] | None  # what the chat template sees
    named: bool = False  # tool_choice named one function

    def finish_reason(self, called_tools: bool, reason: str | None) -> str | None:
        """OpenAI's finish_reason for a choice: "tool_calls" when it called tools on its own
        (`auto`, `required`; as vLLM, also when the output then reached max_tokens); a named
        function's forced call finishes as "stop", as OpenAI reports it."""
        if self.named or not called_tools:
            return reason
        return "tool_calls" if reason in ("stop", "length") else reason

    def stream(self) -> ToolCallStream | None:
        """A fresh parser stream for one streamed choice (None: the text is plain content)."""
        return ToolCallStream(self.parser) if self.parser is not None else None

    @property
    def skip_special_tokens(self) -> bool:
        # Formats whose markers are special tokens need them in the text the parser reads.
        return self.parser is None or not self.parser.special_tokens


def _functions(tools: list[dict[str, Any]]) -> list[Function]:
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") or {}
        params = function.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolChoiceError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out.append(Function(str(function.get("name")), params))
    return out


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool,
    parser_name: str | None,
) -> ToolPlan:
    """The plan for a request, or ToolChoiceError naming what is wrong (a 400)."""
    try:
        check_tools(tools)
    except ChatInputError as exc:
        raise ToolChoiceError(str(exc), "tools") from exc
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolChoiceError("tool_choice needs tools: this request declares none", "tool_choice")
        return ToolPlan(None, None, None)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(None, None, tools)
    functions = _functions(tools)
    named: str | None = None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        chosen = [f for f in functions if f.name == name]
        if not chosen:
            raise ToolChoiceError(
                f"tool_choice names the function {name!r}, which is not among the request's tools "
                f"{[f.name for f in functions]}",
                "tool_choice",
            )
        functions, named = chosen, chosen[0].name
    elif choice not in ("auto", "required"):
        raise ToolChoiceError(
            f"tool_choice {choice!r} is not one of 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if parser_name is None:
        if choice == "auto":
            raise ToolChoiceError(
                "tool_choice 'auto' needs the server to be started with --tool-call-parser (hermes, "
                "llama3_json, mistral or deepseek_v3) for this model's call format; 'none', 'required' "
                "and a named function work without it",
                "tool_choice",
            )
        # vLLM's way without a format: the output is JSON only, held to a JSON schema.
        schema = BareJsonParser.schema(functions, named)
        return ToolPlan(BareJsonParser(named), GuidedDecodingParams(json=schema), tools, named is not None)
    parser = get_parser(parser_name)
    if choice == "auto":
        return ToolPlan(parser, None, tools)
    # A named function is called once; `required` may call several when parallel calls are on.
    parallel = parallel_tool_calls and not isinstance(choice, dict)
    try:
        grammar = parser.grammar(functions, parallel, json_schema_rules)
    except ImportError as exc:
        raise ToolChoiceError(
            f"tool_choice 'required' or a named function needs the structured-output engine ({exc}); "
            "pip install 'anyquant[structured]'",
            "tool_choice",
        ) from exc
    except Exception as exc:  # the grammar engine's refusal of a schema (its types vary)
        raise ToolChoiceError(f"a tool's parameters are not a usable JSON schema: {exc}", "tools") from exc
    return ToolPlan(parser, GuidedDecodingParams(grammar=grammar), tools, isinstance(choice, dict))


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [call.json() for call in calls]


def assistant_message(plan: ToolPlan, text: str) -> tuple[dict[str, Any], bool]:
    """The response message for a whole output, and whether it called tools."""
    if plan.parser is None:
        return {"role": "assistant", "content": text}, False
    content, calls = parse(plan.parser, text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = tool_calls_json(calls)
    return message, bool(calls)
