"""Tool-call parsers: a model's raw output text -> content plus OpenAI tool calls, whole or streamed.

One small class per output format, under vLLM's `--tool-call-parser` names: `hermes` (Qwen2.5 /
Qwen3 / Hermes `<tool_call>{json}</tool_call>`), `llama3_json` (Llama 3.x `{"name", "parameters"}`,
optionally after `<|python_tag|>`), `mistral` (`[TOOL_CALLS][{...}, ...]`, and the newer
`[TOOL_CALLS]name[ARGS]{...}`), `deepseek_v3` (`<｜tool▁call▁begin｜>function<｜tool▁sep｜>name` then
a fenced JSON block). A parser only says where a call begins and ends and how to read one call;
`ToolCallStream` does the rest for both the streamed and the whole response, so that the deltas a
client reassembles are by construction the non-streamed result: the whole response is the stream
fed in one piece. A call is sent once it is complete and parses (its name, then its arguments), so
a client never holds half of a call that turns out malformed; malformed calls stay plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

_DECODER = json.JSONDecoder()
# (rule name, JSON schema) -> EBNF rules defining that rule (and helpers of its own).
JsonRule = Callable[[str, dict[str, Any]], str]


@dataclass(frozen=True)
class Function:
    """A tool the request declares: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any]


def call_schema(tools: list[Function], arguments_key: str) -> dict[str, Any]:
    """JSON schema of one call object of any of `tools`: {"name": <const>, <arguments_key>: ...}."""
    cases = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return cases[0] if len(cases) == 1 else {"anyOf": cases}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire form)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call(name: Any, arguments: Any) -> ToolCall | None:
    """A call from its decoded parts, or None when they are not a name and an arguments object."""
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _json_value(text: str, start: int) -> tuple[Any, int] | None:
    """The complete JSON value starting at `start` (after whitespace) and the index after it; None
    while it is incomplete or not JSON. Once complete, later text cannot change it."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    try:
        return _DECODER.raw_decode(text, i)
    except json.JSONDecodeError:
        return None


class ToolParser(ABC):
    """Where calls begin and end in one format, and how to read one. `special_tokens`: the format's
    markers are special tokens, so the output must be detokenized with them kept."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]  # strings that start a call (held back while incomplete)
    special_tokens: ClassVar[bool] = False
    separators: ClassVar[tuple[str, ...]] = ()  # text between calls that is dropped
    # Characters a call can end on (JSON brackets, the `>` of end markers): an incomplete call is
    # read again only once one of them has arrived, so a long call costs linear, not quadratic, time.
    closers: ClassVar[str] = "}]>"

    def find_start(self, text: str, pos: int, in_calls: bool) -> int | None:
        """Index of the first call start at or after `pos`; `in_calls`: only calls and separators
        came since the last call (some formats begin a call without a marker there)."""
        hits = [i for i in (text.find(m, pos) for m in self.markers) if i >= 0]
        return min(hits) if hits else None

    @abstractmethod
    def read_call(self, text: str, start: int) -> tuple[list[ToolCall] | None, int] | None:
        """The call(s) of the block starting at `start` and the index after the block: None while
        the block is incomplete; (None, end) when it is complete but malformed."""

    # The key of a call's JSON object that holds its arguments (JSON formats only).
    arguments_key: ClassVar[str] = "arguments"

    def grammar(self, tools: list[Function], parallel: bool, json_rule: JsonRule) -> str:
        """EBNF (xgrammar's dialect) for output made of calls of `tools` only (tool_choice
        `required` or a named function): the format's wrapper around JSON whose rules
        `json_rule(rule_name, schema)` writes. One call, or several when `parallel`."""
        call = json_rule("call", call_schema(tools, self.arguments_key))
        return f"{self._calls_grammar(parallel)}\n{call}"

    def _calls_grammar(self, parallel: bool) -> str:
        raise NotImplementedError(f"{self.name}: no grammar for enforced tool calls")


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _END = "</tool_call>"

    def read_call(self, text: str, start: int) -> tuple[list[ToolCall] | None, int] | None:
        end = text.find(self._END, start)
        if end < 0:
            return None
        body = text[start + len(self.markers[0]) : end].strip()
        after = end + len(self._END)
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None, after
        if not isinstance(value, dict):
            return None, after
        call = _call(value.get("name"), value.get("arguments", value.get("parameters")))
        return ([call] if call else None), after

    def _calls_grammar(self, parallel: bool) -> str:
        more = ' ("\\n" block)*' if parallel else ""
        return f'root ::= block{more}\nblock ::= "<tool_call>\\n" call "\\n</tool_call>"'


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>",)
    special_tokens = True
    separators = (";",)

    def find_start(self, text: str, pos: int, in_calls: bool) -> int | None:
        tag = text.find(self.markers[0], pos)
        rest = text[pos:]
        # A bare JSON call counts only at the start of the output or right after another call:
        # elsewhere a `{` is ordinary text.
        if (pos == 0 or in_calls) and rest.lstrip().startswith("{"):
            brace = pos + len(rest) - len(rest.lstrip())
            return brace if tag < 0 else min(tag, brace)
        return tag if tag >= 0 else None

    def read_call(self, text: str, start: int) -> tuple[list[ToolCall] | None, int] | None:
        begin = start + len(self.markers[0]) if text.startswith(self.markers[0], start) else start
        found = _json_value(text, begin)
        if found is None:
            return None
        value, end = found
        if not isinstance(value, dict):
            return None, end
        call = _call(value.get("name"), value.get("parameters", value.get("arguments")))
        return ([call] if call else None), end

    arguments_key = "parameters"

    def _calls_grammar(self, parallel: bool) -> str:
        return 'root ::= call ("; " call)*' if parallel else "root ::= call"


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    special_tokens = True
    _ARGS = "[ARGS]"

    def read_call(self, text: str, start: int) -> tuple[list[ToolCall] | None, int] | None:
        begin = start + len(self.markers[0])
        rest = text[begin:].lstrip()
        if not rest:
            return None
        if rest[0] in "[{":  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
            found = _json_value(text, begin)
            if found is None:
                return None
            value, end = found
            items = value if isinstance(value, list) else [value]
            calls = [
                _call(v.get("name"), v.get("arguments", v.get("parameters"))) if isinstance(v, dict) else None
                for v in items
            ]
            good = [c for c in calls if c is not None]
            return (good if good and len(good) == len(calls) else None), end
        args = text.find(self._ARGS, begin)  # [TOOL_CALLS]name[ARGS]{...}
        if args < 0:
            return None
        found = _json_value(text, args + len(self._ARGS))
        if found is None:
            return None
        value, end = found
        call = _call(text[begin:args].strip(), value)
        return ([call] if call else None), end

    def _calls_grammar(self, parallel: bool) -> str:
        more = ' (", " call)*' if parallel else ""
        return f'root ::= "[TOOL_CALLS][" call{more} "]"'


class DeepSeekV3Parser(ToolParser):
    name = "deepseek_v3"
    _BEGIN = "<｜tool▁call▁begin｜>"
    _SEP = "<｜tool▁sep｜>"
    _END = "<｜tool▁call▁end｜>"
    markers = (_BEGIN,)
    special_tokens = True
    # The wrapper around the list of calls carries nothing.
    separators = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    _FENCED = re.compile(r"\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)

    def find_start(self, text: str, pos: int, in_calls: bool) -> int | None:
        # The list wrapper starts the tool region too: hold it (and drop it) like a marker.
        hits = [i for i in (text.find(m, pos) for m in (*self.markers, self.separators[0])) if i >= 0]
        return min(hits) if hits else None

    def read_call(self, text: str, start: int) -> tuple[list[ToolCall] | None, int] | None:
        if text.startswith(self.separators[0], start):
            return [], start + len(self.separators[0])  # the list's opening: no call yet
        end = text.find(self._END, start)
        if end < 0:
            return None
        after = end + len(self._END)
        body = text[start + len(self._BEGIN) : end]
        kind, sep, rest = body.partition(self._SEP)
        if not sep or kind.strip() != "function":
            return None, after
        name, _, args = rest.partition("\n")
        fenced = self._FENCED.match(args)
        try:
            value = json.loads(fenced.group(1) if fenced else args)
        except json.JSONDecodeError:
            return None, after
        call = _call(name.strip(), value)
        return ([call] if call else None), after

    def grammar(self, tools: list[Function], parallel: bool, json_rule: JsonRule) -> str:
        # Name and arguments are apart in this format: one alternative per tool ties them.
        lines = [
            f'root ::= "{self.separators[0]}" block{"+" if parallel else ""} "{self.separators[1]}"',
            "block ::= " + " | ".join(f"block_{i}" for i in range(len(tools))),
        ]
        for i, tool in enumerate(tools):
            head = json.dumps(f"{self._BEGIN}function{self._SEP}{tool.name}\n```json\n", ensure_ascii=False)
            tail = json.dumps(f"\n```{self._END}", ensure_ascii=False)
            lines.append(f"block_{i} ::= {head} args_{i} {tail}")
            lines.append(json_rule(f"args_{i}", tool.parameters))
        return "\n".join(lines)


class BareJsonParser(ToolParser):
    """No model format, as vLLM does `required` and named choices without a parser: the output is
    only JSON, enforced by a JSON schema (`schema`): a list of {"name", "parameters"} calls, or
    for a named function (`function` set) that function's arguments alone."""

    name = "json"
    markers = ()

    def __init__(self, function: str | None = None) -> None:
        self.function = function

    def find_start(self, text: str, pos: int, in_calls: bool) -> int | None:
        rest = text[pos:]
        opener = "{" if self.function else "["
        return pos + len(rest) - len(rest.lstrip()) if pos == 0 and rest.lstrip().startswith(opener) else None

    def read_call(self, text: str, start: int) -> tuple[list[ToolCall] | None, int] | None:
        found = _json_value(text, start)
        if found is None:
            return None
        value, end = found
        if self.function is not None:
            call = _call(self.function, value)
            return ([call] if call else None), end
        items = value if isinstance(value, list) else []
        calls = [_call(v.get("name"), v.get("parameters")) if isinstance(v, dict) else None for v in items]
        good = [c for c in calls if c is not None]
        return (good if good and len(good) == len(calls) else None), end

    @staticmethod
    def schema(tools: list[Function], function: str | None) -> dict[str, Any]:
        if function is not None:
            return next(t.parameters for t in tools if t.name == function)
        return {"type": "array", "minItems": 1, "items": call_schema(tools, "parameters")}


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, DeepSeekV3Parser)
}


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(PARSERS)}")
    return PARSERS[name]()


@dataclass
class StreamDelta:
    """What one piece of output adds: content text and calls completed by it."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ToolCallStream:
    """Splits a growing output text into content and calls. `feed(text)` returns what may be sent
    now; `finish()` what is left. Content that may still turn out to be the start of a call (a
    partial marker, trailing whitespace before one) is held back until that is known."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.pos = 0  # text before this is decided (sent as content, or read as calls / separators)
        self.in_calls = False  # only calls and separators since the last call
        self.content = ""
        self.calls: list[ToolCall] = []
        self.broken = False  # the parser failed: everything from here on is content
        self._incomplete = (-1, 0)  # (start, text length) of the last read of an incomplete call

    def feed(self, new_text: str) -> StreamDelta:
        self.text += new_text
        return self._guarded(final=False)

    def finish(self) -> StreamDelta:
        return self._guarded(final=True)

    def _guarded(self, final: bool) -> StreamDelta:
        """`_advance`, except that output the parser cannot cope with (e.g. JSON nested deeper
        than Python's recursion limit) turns the rest of the output into plain content."""
        if not self.broken:
            saved = (self.pos, len(self.calls), self.content, self.in_calls)
            try:
                return self._advance(final)
            except Exception:
                self.pos, calls, self.content, self.in_calls = saved
                del self.calls[calls:]
                self.broken = True
        out = StreamDelta()
        self._emit(out, len(self.text))
        return out

    def _advance(self, final: bool) -> StreamDelta:
        out = StreamDelta()
        text = self.text
        while self.pos < len(text):
            self._skip_separators()
            start = self.parser.find_start(text, self.pos, self.in_calls)
            if start is None:
                self._emit(out, len(text) if final else self._safe_end())
                break
            # Whitespace right before a call belongs to neither; it is text if the call fails.
            before = text[self.pos : start]
            self._emit(out, self.pos + len(before.rstrip()))
            if not final and self._still_incomplete(start):
                break
            read = self.parser.read_call(text, start)
            if read is None:  # the block is still incomplete
                if final:
                    self._emit(out, len(text))
                self._incomplete = (start, len(text))
                break
            calls, end = read
            if calls is None:  # malformed: it stays text
                self._emit(out, end)
                continue
            out.calls.extend(calls)
            self.calls.extend(calls)
            self.in_calls = True
            self.pos = end
        return out

    def _still_incomplete(self, start: int) -> bool:
        """Whether the call at `start` was incomplete when last read and nothing it could end on
        has arrived since."""
        last_start, last_len = self._incomplete
        return last_start == start and not any(c in self.parser.closers for c in self.text[last_len:])

    def _skip_separators(self) -> None:
        if not self.in_calls:
            return
        moved = True
        while moved:
            moved = False
            at = len(self.text) - len(self.text[self.pos :].lstrip())
            for sep in self.parser.separators:
                if self.text.startswith(sep, at):
                    self.pos, moved = at + len(sep), True

    def _safe_end(self) -> int:
        """The end of the text that can be sent as content now: without a suffix that may be the
        start of a marker, and without trailing whitespace (dropped if a call follows)."""
        text = self.text
        end = len(text)
        for marker in (*self.parser.markers, *self.parser.separators):
            for n in range(min(len(marker) - 1, end - self.pos), 0, -1):
                if text.endswith(marker[:n]):
                    end = min(end, len(text) - n)
                    break
        return max(len(text[:end].rstrip()), self.pos)

    def _emit(self, out: StreamDelta, end: int) -> None:
        """Send text[pos:end] as content; whitespace alone next to calls is dropped."""
        content = self.text[self.pos : end]
        self.pos = max(self.pos, end)
        if not content or (self.calls and not content.strip()):
            return
        out.content += content
        self.content += content
        self.in_calls = False


def parse(parser: ToolParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """The whole output at once: (content or None when there is none besides calls, calls)."""
    stream = ToolCallStream(parser)
    stream.feed(text)
    stream.finish()
    return (stream.content or None) if stream.calls else stream.content, stream.calls
