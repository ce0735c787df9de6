"""Tool-call parsers on fixed model outputs in each format: calls and content come out as the format
defines them, malformed output stays plain content, and however the text is split into streamed
pieces the deltas reassemble into the whole-response result."""

from __future__ import annotations

import json
import random

import pytest

from anyquant.server.tool_parsers import PARSERS, ToolCallStream, get_parser, parse

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"zone": "Europe/Paris"}

# (parser, model output, expected content, expected [(name, arguments)])
CASES = [
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>',
        "Let me look.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("hermes", "No tools needed: 2 < 3 and {a: 1}.", "No tools needed: 2 < 3 and {a: 1}.", []),
    # Malformed JSON inside the wrapper: plain content, as written.
    (
        "hermes",
        'Sure <tool_call>{"name": "get_weather", "arguments": {bad}}</tool_call>',
        'Sure <tool_call>{"name": "get_weather", "arguments": {bad}}</tool_call>',
        [],
    ),
    # Never closed: plain content.
    ("hermes", 'A <tool_call>{"name": "x"', 'A <tool_call>{"name": "x"', []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"zone": "Europe/Paris"}}',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("llama3_json", 'The set {"a": 1} is small.', 'The set {"a": 1} is small.', []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}]',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "mistral",
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}',
        "Checking.",
        [("get_weather", WEATHER)],
    ),
    ("mistral", "[TOOL_CALLS][{oops}]", "[TOOL_CALLS][{oops}]", []),
    (
        "deepseek_v3",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
        '<｜tool▁sep｜>get_time\n```json\n{"zone": "Europe/Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "deepseek_v3",
        "I will check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "I will check.",
        [("get_weather", WEATHER)],
    ),
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_parse_whole_output(name: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse(get_parser(name), text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_streamed_pieces_reassemble_into_the_whole_result(
    name: str, text: str, content: str | None, calls: list
) -> None:
    rng = random.Random(len(text))
    for trial in range(30):
        # Character by character first, then random splits.
        cuts = (
            list(range(1, len(text)))
            if trial == 0
            else sorted(rng.sample(range(1, len(text)), k=rng.randint(1, 8)))
        )
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stream = ToolCallStream(get_parser(name))
        got_text, got_calls = "", []
        for piece in pieces:
            delta = stream.feed(piece)
            got_text += delta.content
            got_calls += delta.calls
        delta = stream.finish()
        got_text += delta.content
        got_calls += delta.calls
        assert (got_text or None if calls else got_text) == content, pieces
        assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls


def test_content_is_held_back_only_while_it_may_start_a_call() -> None:
    stream = ToolCallStream(get_parser("hermes"))
    assert stream.feed("Hello <tool").content == "Hello"
    assert stream.feed("box> there").content == " <toolbox> there"


def test_unknown_parser_names_the_choices() -> None:
    with pytest.raises(ValueError, match="deepseek_v3"):
        get_parser("nope")
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral", "deepseek_v3"}


# -- grammars for tool_choice "required" / a named function ------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    },
]
# What a model would write for one call of each tool, per format.
CALL_TEXT = {
    "hermes": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>',
        "\n",
    ),
    "llama3_json": (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        '{"name": "get_time", "parameters": {"zone": "Europe/Paris"}}',
        "; ",
    ),
    "deepseek_v3": (
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris", "unit": "celsius"}'
        "\n```<｜tool▁call▁end｜>",
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"zone": "Europe/Paris"}\n```<｜tool▁call▁end｜>',
        "",
    ),
}


def _wrap(parser: str, calls: list[str]) -> str:
    sep = CALL_TEXT[parser][2]
    if parser == "deepseek_v3":
        return "<｜tool▁calls▁begin｜>" + "".join(calls) + "<｜tool▁calls▁end｜>"
    return sep.join(calls)


def _accepts(grammar: str, text: str) -> bool:
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    return bool(_is_grammar_accept_string(xgrammar.Grammar.from_ebnf(grammar), text))


@pytest.mark.parametrize("name", sorted(CALL_TEXT))
def test_required_grammar_accepts_exactly_the_declared_calls(name: str) -> None:
    from anyquant.server.tools import plan_tools

    weather, clock, _ = CALL_TEXT[name]
    plan = plan_tools(TOOLS, "required", True, name)
    assert plan.guided is not None and plan.guided.grammar is not None
    grammar = plan.guided.grammar
    both = _wrap(name, [weather, clock])
    for text in (_wrap(name, [weather]), _wrap(name, [clock]), both):
        assert _accepts(grammar, text), text
        content, calls = parse(get_parser(name), text)
        assert content is None and calls
    assert [c.name for c in parse(get_parser(name), both)[1]] == ["get_weather", "get_time"]
    # A tool that is not declared, arguments off the schema, and plain text are all refused.
    assert not _accepts(grammar, _wrap(name, [weather.replace("get_weather", "get_wether")]))
    assert not _accepts(grammar, _wrap(name, [weather.replace('"celsius"', '"kelvin"')]))
    assert not _accepts(grammar, _wrap(name, [clock.replace('"zone"', '"zones"')]))
    assert not _accepts(grammar, "The weather is fine.")

    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, True, name)
    assert named.guided is not None and named.guided.grammar is not None
    assert _accepts(named.guided.grammar, _wrap(name, [clock]))
    assert not _accepts(named.guided.grammar, _wrap(name, [weather]))
    assert not _accepts(named.guided.grammar, both)  # a named function is called once


def test_mistral_required_grammar() -> None:
    from anyquant.server.tools import plan_tools

    plan = plan_tools(TOOLS, "required", True, "mistral")
    assert plan.guided is not None and plan.guided.grammar is not None
    text = (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {"zone": "UTC"}}]'
    )
    assert _accepts(plan.guided.grammar, text)
    assert [c.name for c in parse(get_parser("mistral"), text)[1]] == ["get_weather", "get_time"]
    assert not _accepts(plan.guided.grammar, text.replace("get_time", "get_date"))


def test_schema_rules_keep_string_literals_and_prefix_helpers() -> None:
    from anyquant.server.tools import json_schema_rules

    # A property literally named "root" must stay "root" in the JSON the grammar accepts.
    schema = {"type": "object", "properties": {"root": {"type": "integer"}}, "required": ["root"]}
    rules = json_schema_rules("args", schema)
    grammar = f"root ::= args\n{rules}"
    assert _accepts(grammar, '{"root": 3}')
    assert not _accepts(grammar, '{"args": 3}')
    assert "args__basic_integer" in rules or "args__" in rules


@pytest.mark.parametrize(
    ("tools", "choice", "parser", "message"),
    [
        (None, "required", "hermes", "tool_choice needs tools"),
        (
            TOOLS,
            {"type": "function", "function": {"name": "nope"}},
            "hermes",
            "not among the request's tools",
        ),
        (TOOLS, "sometimes", "hermes", "is not one of"),
        (TOOLS, "auto", None, "--tool-call-parser"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
            "required",
            "hermes",
            "not a usable JSON schema",
        ),
    ],
)
def test_bad_tool_choice_is_named(
    tools: list | None, choice: object, parser: str | None, message: str
) -> None:
    from anyquant.server.tools import ToolChoiceError, plan_tools

    with pytest.raises(ToolChoiceError, match=message):
        plan_tools(tools, choice, True, parser)  # type: ignore[arg-type]


def _grammar_walk(compiled: object, info: object, seed: int) -> str:
    """One output the grammar allows, chosen at random byte by byte (ASCII where allowed), as an
    engine enforcing it would sample it from a random model."""
    import xgrammar
    from xgrammar.testing import _get_masked_tokens_from_bitmask

    rng = random.Random(seed)
    matcher = xgrammar.GrammarMatcher(compiled)  # type: ignore[arg-type]
    bitmask = xgrammar.allocate_token_bitmask(1, 257)
    out = bytearray()
    for _ in range(20_000):
        if matcher.is_terminated():
            break
        matcher.fill_next_token_bitmask(bitmask)
        allowed = sorted(set(range(257)) - set(_get_masked_tokens_from_bitmask(bitmask, 257)))
        token = rng.choice([t for t in allowed if t < 128 or t == 256] or allowed)
        assert matcher.accept_token(token)
        if token < 256:
            out.append(token)
    assert matcher.is_terminated()
    return out.decode("utf-8")


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_output_the_required_grammar_allows_parses_into_declared_calls(name: str) -> None:
    import jsonschema_rs
    import xgrammar

    from anyquant.server.tools import plan_tools

    # A byte vocabulary and an end token: the grammar decides every byte.
    info = xgrammar.TokenizerInfo([bytes([b]) for b in range(256)] + [b"</s>"], stop_token_ids=[256])
    compiler = xgrammar.GrammarCompiler(info)
    schemas = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in TOOLS}
    for choice, names in (
        ("required", set(schemas)),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ):
        guided = plan_tools(TOOLS, choice, True, name).guided  # type: ignore[arg-type]
        assert guided is not None and guided.grammar is not None
        compiled = compiler.compile_grammar(guided.grammar)
        for seed in range(8):
            text = _grammar_walk(compiled, info, seed)
            content, calls = parse(get_parser(name), text)
            assert content is None and calls, text
            for call in calls:
                assert call.name in names
                assert schemas[call.name].is_valid(json.loads(call.arguments)), text


def test_without_a_parser_required_and_named_choices_are_bare_json_as_in_vllm() -> None:
    import jsonschema_rs

    from anyquant.server.tools import assistant_message, plan_tools

    required = plan_tools(TOOLS, "required", True, None)
    assert required.guided is not None and isinstance(required.guided.json, dict)
    text = '[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}]'
    assert jsonschema_rs.validator_for(required.guided.json).is_valid(json.loads(text))
    assert not jsonschema_rs.validator_for(required.guided.json).is_valid(
        [{"name": "get_date", "parameters": {}}]
    )
    message, called = assistant_message(required, text)
    assert called and message["content"] is None
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
    ] == [
        ("get_time", {"zone": "UTC"}),
        ("get_weather", {"city": "Oslo", "unit": "celsius"}),
    ]
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, True, None)
    assert named.guided is not None and named.guided.json == TOOLS[1]["function"]["parameters"]
    message, called = assistant_message(named, ' {"zone": "UTC"}')
    assert called and message["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": '{"zone": "UTC"}',
    }
    # Output that is not the enforced JSON (an engine that did not enforce it) stays content.
    assert assistant_message(named, "hello") == ({"role": "assistant", "content": "hello"}, False)
    for plan, whole in ((required, text), (named, '{"zone": "UTC"}')):
        assert plan.parser is not None
        stream = ToolCallStream(plan.parser)
        pieces = [stream.feed(whole[i : i + 3]) for i in range(0, len(whole), 3)] + [stream.finish()]
        assert "".join(p.content for p in pieces) == ""
        assert [c.arguments for p in pieces for c in p.calls] == [
            c.arguments for c in parse(plan.parser, whole)[1]
        ]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_output_the_parser_cannot_cope_with_becomes_content(name: str) -> None:
    opener = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "deepseek_v3": "", "llama3_json": ""}[name]
    text = "Hi " + opener + "[" * 100_000 + "]" * 100_000 + ("</tool_call>" if name == "hermes" else "")
    content, calls = parse(get_parser(name), text)
    assert calls == [] and content is not None and content.replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize(
    "choice", [{"function": "get_time"}, {"type": "function"}, {"function": {"name": 3}}]
)
def test_malformed_named_choices_are_refused(choice: dict) -> None:
    from anyquant.server.tools import ToolChoiceError, plan_tools

    for parser in ("hermes", None):
        with pytest.raises(ToolChoiceError, match="not among the request's tools"):
            plan_tools(TOOLS, choice, True, parser)
