"""Reasoning / content / tool-call parsing of Qwen3 output, streamed and whole."""

import json
import logging
import re

import pytest

from qwenstack.serving.parsers import (
    ChatOutputParser,
    ParsedDelta,
    ParsedMessage,
    ToolCall,
    finish_reason_for,
    parse_chat_output,
)

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "hours": {"type": "array"},
                    "note": {"type": ["string", "null"]},
                    "scale": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                },
            },
        },
    }
]

CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# arguments given as a JSON string rather than an object
CALL_ROME = (
    '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'
)
XML_CALL = (
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nSão Paulo\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    "<parameter=metric>\nTrue\n</parameter>\n"
    "<parameter=hours>\n[9, 12]\n</parameter>\n"
    "<parameter=note>\nnull\n</parameter>\n"
    "<parameter=scale>\n1.5\n</parameter>\n"
    "</function>\n</tool_call>"
)
MALFORMED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'

# (case id, generated text, parser options, expected message; tool call ids are not compared)
CASES = [
    (
        "thinking_then_answer",
        "<think>\nThe user greets me.\n</think>\n\nHello!",
        {},
        ParsedMessage("The user greets me.", "Hello!", []),
    ),
    (
        "starts_in_reasoning",
        "Prefilled think.\n</think>\n\nAnswer.",
        {"starts_in_reasoning": True},
        ParsedMessage("Prefilled think.", "Answer.", []),
    ),
    ("no_thinking", "Just an answer.\n", {}, ParsedMessage(None, "Just an answer.\n", [])),
    (
        "empty_think_block",
        "<think>\n\n</think>\n\nHi",
        {},
        ParsedMessage(None, "Hi", []),
    ),
    (
        "unterminated_thinking",
        "\n<think>\nStill thinking <tool_call> when max_tokens hit",
        {"tools_enabled": True},
        ParsedMessage("Still thinking <tool_call> when max_tokens hit", None, []),
    ),
    (
        "one_call",
        "<think>\nNeed weather.\n</think>\n\n" + CALL_PARIS,
        {"tools_enabled": True},
        ParsedMessage(
            "Need weather.", None, [ToolCall("", "get_weather", '{"city": "Paris"}', 0)]
        ),
    ),
    (
        "two_parallel_calls",
        "Checking both.\n\n" + CALL_PARIS + "\n" + CALL_ROME + "\n",
        {"tools_enabled": True},
        ParsedMessage(
            None,
            "Checking both.",
            [
                ToolCall("", "get_weather", '{"city": "Paris"}', 0),
                ToolCall("", "get_weather", '{"city": "Rome"}', 1),
            ],
        ),
    ),
    (
        "tool_call_mentioned_in_thinking",
        "<think>\nI could emit <tool_call> {...} </tool_call> here.\n</think>\n\n" + CALL_PARIS,
        {"tools_enabled": True},
        ParsedMessage(
            "I could emit <tool_call> {...} </tool_call> here.",
            None,
            [ToolCall("", "get_weather", '{"city": "Paris"}', 0)],
        ),
    ),
    (
        "malformed_json",
        "Let me see.\n" + MALFORMED,
        {"tools_enabled": True},
        ParsedMessage(None, "Let me see.\n" + MALFORMED, []),
    ),
    (
        "xml_typed_parameters",
        XML_CALL,
        {"tools_enabled": True, "tool_schemas": WEATHER_TOOLS},
        ParsedMessage(
            None,
            None,
            [
                ToolCall(
                    "",
                    "get_weather",
                    json.dumps(
                        {
                            "city": "São Paulo",
                            "days": 3,
                            "metric": True,
                            "hours": [9, 12],
                            "note": None,
                            "scale": 1.5,
                        },
                        ensure_ascii=False,
                    ),
                    0,
                )
            ],
        ),
    ),
    (
        "tools_disabled",
        "<think>\nhm\n</think>\n\n" + CALL_PARIS,
        {},
        ParsedMessage("hm", CALL_PARIS, []),
    ),
    (
        "unterminated_call_that_parses",
        CALL_PARIS.removesuffix("</tool_call>"),
        {"tools_enabled": True},
        ParsedMessage(None, None, [ToolCall("", "get_weather", '{"city": "Paris"}', 0)]),
    ),
    (
        "call_cut_before_its_name_is_whole",  # only markup so far: dropped
        'Text <tool_call>\n{"name": "get_wea',
        {"tools_enabled": True},
        ParsedMessage(None, "Text", []),
    ),
    (
        "call_cut_in_its_arguments",  # OpenAI's shape for a call cut by max_tokens: the arguments so far
        'Text <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        {"tools_enabled": True},
        ParsedMessage(None, "Text", [ToolCall("", "get_weather", '{"city": "Par', 0)]),
    ),
    (
        "call_cut_after_its_name",
        '<tool_call>\n{"name": "get_weather", "argu',
        {"tools_enabled": True},
        ParsedMessage(None, None, [ToolCall("", "get_weather", "", 0)]),
    ),
    (
        "mixed_formats_text_between_calls_and_malformed_after",
        XML_CALL.replace("São Paulo", "Oslo") + "\nand also\n" + CALL_PARIS + "\n" + MALFORMED,
        {"tools_enabled": True},
        ParsedMessage(
            None,
            "and also" + MALFORMED,
            [
                # no schemas: parameter values stay strings
                ToolCall(
                    "",
                    "get_weather",
                    '{"city": "Oslo", "days": "3", "metric": "True", '
                    '"hours": "[9, 12]", "note": "null", "scale": "1.5"}',
                    0,
                ),
                ToolCall("", "get_weather", '{"city": "Paris"}', 1),
            ],
        ),
    ),
    (
        "stray_close_think_without_flag_stays_content",
        "thoughts\n</think>\n\nanswer",
        {},
        ParsedMessage(None, "thoughts\n</think>\n\nanswer", []),
    ),
    (
        # A grammar-forced call may write `</tool_call>` inside an argument: the JSON is whole only with it.
        "close_tag_inside_an_argument_string",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>\\"b"}}\n</tool_call>',
        {"tools_enabled": True},
        ParsedMessage(None, None, [ToolCall("", "get_weather", '{"city": "a</tool_call>\\"b"}', 0)]),
    ),
    (
        # Thinking off (the template closed an empty block): a `<think>` the answer writes is text.
        "think_tag_is_text_when_thinking_is_off",
        'Hello <think> there\n{"a": "<think>"}',
        {"thinking": False},
        ParsedMessage(None, 'Hello <think> there\n{"a": "<think>"}', []),
    ),
    (
        # Thinking comes first: a JSON answer's string may hold `<think>` (a grammar allows it); it is text.
        "think_tag_after_answer_text_is_text",
        '{"a": "x<think>y"}',
        {},
        ParsedMessage(None, '{"a": "x<think>y"}', []),
    ),
    (
        # A format binds the answer: calls come before it, so a `<tool_call>` inside it is text.
        "call_tag_inside_a_bound_answer_is_text",
        '{"a": "x<tool_call>y", "b": "</tool_call>"}',
        {"tools_enabled": True, "bound_answer": True},
        ParsedMessage(None, '{"a": "x<tool_call>y", "b": "</tool_call>"}', []),
    ),
    (
        "bound_answer_still_takes_calls_first",
        CALL_PARIS,
        {"tools_enabled": True, "bound_answer": True},
        ParsedMessage(None, None, [ToolCall("", "get_weather", '{"city": "Paris"}', 0)]),
    ),
    (
        "stray_partial_tags_are_text",
        "a <thin b </tool_ c <",
        {"tools_enabled": True},
        ParsedMessage(None, "a <thin b </tool_ c <", []),
    ),
]


def _compare(got: ParsedMessage, want: ParsedMessage) -> None:
    assert got.reasoning == want.reasoning
    assert got.content == want.content
    assert [(c.index, c.type, c.name, c.arguments) for c in got.tool_calls] == [
        (c.index, c.type, c.name, c.arguments) for c in want.tool_calls
    ]
    for call in got.tool_calls:
        assert re.fullmatch(r"call_[0-9a-zA-Z]{24}", call.id)


@pytest.mark.parametrize("name,text,opts,want", CASES, ids=[c[0] for c in CASES])
def test_parse_chat_output(name, text, opts, want):
    _compare(parse_chat_output(text, **opts), want)


def _stream(pieces: list[str], opts: dict) -> ParsedMessage:
    """Reassembles deltas the way an OpenAI streaming client does."""
    parser = ChatOutputParser(**opts)
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        for tc in d.tool_calls:
            if tc.index not in calls:  # the first fragment names the call
                assert tc.id and tc.name and tc.type == "function" and tc.arguments == ""
                calls[tc.index] = ToolCall(tc.id, tc.name, "", tc.index)
            else:
                assert tc.id is None and tc.name is None
                calls[tc.index].arguments += tc.arguments
    return ParsedMessage(reasoning or None, content or None, [calls[i] for i in sorted(calls)])


@pytest.mark.parametrize("name,text,opts,want", CASES, ids=[c[0] for c in CASES])
def test_streaming_matches_whole_at_every_split(name, text, opts, want):
    for i in range(len(text) + 1):
        _compare(_stream([text[:i], text[i:]], opts), want)
    _compare(_stream(list(text), opts), want)


def test_partial_tag_is_held_back_then_resolved():
    parser = ChatOutputParser()
    assert parser.feed("<thi") == ParsedDelta()
    assert parser.feed("nk>\nreasoning") == ParsedDelta(reasoning="reasoning")
    # The newline may precede `</think>`, so it waits.
    assert parser.feed(" more\n") == ParsedDelta(reasoning=" more")
    assert parser.feed("</th") == ParsedDelta()
    assert parser.feed("ink>\n\nAns") == ParsedDelta(content="Ans")
    assert parser.feed("wer") == ParsedDelta(content="wer")
    assert parser.finish() == ParsedDelta()


def test_streamed_call_is_emitted_when_block_closes():
    parser = ChatOutputParser(tools_enabled=True)
    assert parser.feed(CALL_PARIS[:-5]) == ParsedDelta()
    delta = parser.feed(CALL_PARIS[-5:])
    first, args = delta.tool_calls
    assert (first.index, first.name, first.type) == (0, "get_weather", "function")
    assert first.id and first.arguments == ""
    assert (args.index, args.id, args.arguments) == (0, None, '{"city": "Paris"}')


def test_malformed_call_logs_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qwenstack.parsers"):
        msg = parse_chat_output(MALFORMED, tools_enabled=True)
    assert msg.content == MALFORMED and msg.tool_calls == []
    assert any("malformed tool call" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "body",
    ['{"arguments": {}}', "[1, 2]", "<function=>\n</function>", "plain words"],
)
def test_other_malformed_bodies_become_content(body):
    block = f"<tool_call>\n{body}\n</tool_call>"
    assert parse_chat_output(block, tools_enabled=True) == ParsedMessage(None, block, [])


def test_xml_without_schemas_keeps_strings():
    msg = parse_chat_output(XML_CALL, tools_enabled=True)
    args = json.loads(msg.tool_calls[0].arguments)
    assert args["days"] == "3" and args["note"] == "null"


def test_finish_reason_for():
    with_call = parse_chat_output(CALL_PARIS, tools_enabled=True)
    without = parse_chat_output("hi")
    assert finish_reason_for(with_call, "stop") == "tool_calls"
    assert finish_reason_for(with_call, "length") == "length"
    assert finish_reason_for(without, "stop") == "stop"
