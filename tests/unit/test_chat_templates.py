"""Chat templates in every layout checkpoints use, the choice among named ones, overrides, and a
tools conversation rendered exactly as transformers renders it (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyquant.chat import render_chat
from anyquant.errors import CheckpointError
from anyquant.tokenizer import Tokenizer
from anyquant.utils.tiny_model import write_tiny_model

# A Hermes-style template (tools in the system turn, calls in <tool_call> blocks, results in
# <tool_response> blocks), written for these tests.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "Functions you may call:\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n'
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% if m.content %}{{ m.content }}\n{% endif %}"
    "{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>\n'
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & here, in 'Paris' or Zürich",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Zürich?"}],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "m", "llama")


def _config(path: Path, **fields: object) -> None:
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.update(fields)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def _render(path: Path, tools: list | None = None, **kwargs: object) -> str:
    tok = Tokenizer(path, **kwargs)  # type: ignore[arg-type]
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)


def test_tokenizer_config_string(model: Path) -> None:
    _config(model, chat_template=PLAIN)
    assert _render(model) == "[user] hi\n"


def test_tokenizer_config_named_list_picks_tool_use_when_tools_are_given(model: Path) -> None:
    _config(
        model,
        chat_template=[
            {"name": "default", "template": PLAIN},
            {"name": "tool_use", "template": "TOOLS {{ tools | length }}"},
        ],
    )
    assert _render(model) == "[user] hi\n"
    assert _render(model, tools=TOOLS) == "TOOLS 1"


def test_chat_template_jinja_file_wins_over_the_config_field(model: Path) -> None:
    _config(model, chat_template="from the config")
    (model / "chat_template.jinja").write_text(PLAIN)
    assert _render(model) == "[user] hi\n"
    extra = model / "additional_chat_templates"
    extra.mkdir()
    (extra / "tool_use.jinja").write_text("extra tool_use")
    assert _render(model, tools=TOOLS) == "extra tool_use"
    assert _render(model) == "[user] hi\n"


def test_chat_template_json_file(model: Path) -> None:
    (model / "chat_template.json").write_text(json.dumps({"chat_template": PLAIN}))
    assert _render(model) == "[user] hi\n"


def test_override_file_or_inline_text_beats_the_checkpoint(model: Path, tmp_path: Path) -> None:
    (model / "chat_template.jinja").write_text("checkpoint's")
    file = tmp_path / "mine.jinja"
    file.write_text(PLAIN)
    assert _render(model, chat_template=str(file)) == "[user] hi\n"
    assert _render(model, chat_template="{{ messages[0].content }}!") == "hi!"
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer(model, chat_template=str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"tokenizer_config.json": {"chat_template": [{"name": "default"}]}}, r"chat_template\[0\] must be"),
        ({"tokenizer_config.json": {"chat_template": 3}}, "expected a string or a list"),
        ({"chat_template.json": {"template": "x"}}, "expected an object with a 'chat_template' field"),
        ({"chat_template.json": "not json"}, "not valid JSON"),
    ],
)
def test_broken_layouts_name_the_file(model: Path, layout: dict, message: str) -> None:
    for name, value in layout.items():
        if name == "tokenizer_config.json":
            _config(model, **value)
        else:
            (model / name).write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(CheckpointError, match=message):
        Tokenizer(model)


def test_several_named_templates_without_default_is_a_clear_error(model: Path) -> None:
    _config(model, chat_template=[{"name": "a", "template": "A"}, {"name": "b", "template": "B"}])
    with pytest.raises(CheckpointError, match="none is named 'default'"):
        _render(model)


def test_tools_conversation_renders_as_transformers_does(model: Path) -> None:
    """The reference is transformers' own apply_chat_template on the same tokenizer and template."""
    from transformers import PreTrainedTokenizerFast

    _config(model, chat_template=TOOL_TEMPLATE)
    ours = render_chat(Tokenizer(model), CONVERSATION, tools=TOOLS)
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(model / "tokenizer.json"), chat_template=TOOL_TEMPLATE
    )
    # transformers takes the arguments as an object (what our translation makes of the string).
    theirs_messages = json.loads(json.dumps(CONVERSATION))
    theirs_messages[1]["content"] = "Weather in Zürich?"
    theirs_messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Zürich"}
    theirs = reference.apply_chat_template(
        theirs_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    assert '"arguments": {"city": "Zürich"}' in ours  # parsed, not a quoted string
    assert "<now> & here, in 'Paris'" in ours  # tojson leaves <, >, & and ' alone, as transformers'


def test_quantize_output_keeps_and_reads_chat_template_jinja(model: Path, tmp_path: Path) -> None:
    from anyquant.convert.quantize import quantize_checkpoint
    from anyquant.quant.formats.base import WriteOptions

    (model / "chat_template.jinja").write_text(PLAIN)
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("tools: {{ tools | length }}")
    out = tmp_path / "q"
    quantize_checkpoint(model, out, "compressed-tensors", WriteOptions(bits=8, group_size=-1, scheme="W8A16"))
    assert (out / "chat_template.jinja").read_text() == PLAIN
    assert _render(out) == "[user] hi\n"
    assert _render(out, tools=TOOLS) == "tools: 1"


def test_continue_final_message_cuts_as_transformers_does(model: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from anyquant.chat import ChatInputError

    _config(model, chat_template=TOOL_TEMPLATE)
    messages = [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Once upon a"}]
    ours = render_chat(Tokenizer(model), messages, add_generation_prompt=False, continue_final_message=True)
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(model / "tokenizer.json"), chat_template=TOOL_TEMPLATE
    )
    theirs = reference.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours == theirs and ours.endswith("<|im_start|>assistant\nOnce upon a")
    with pytest.raises(ChatInputError, match="cannot both be true"):
        render_chat(Tokenizer(model), messages, continue_final_message=True)
