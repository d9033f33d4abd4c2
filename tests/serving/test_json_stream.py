"""JsonRewriter: JSON text fed in any cut rewrites to exactly json.dumps(json.loads(text), ensure_ascii=False)."""
from __future__ import annotations

import json
import random

import pytest

from qwenstack.serving.json_stream import JsonRewriter

CASES = [
    '{ "city" :"Paris" , "unit":"celsius"}',
    '{"n": 1.50, "big": 1E3, "neg": -0, "list": [ 1 ,2,[ ],{} ], "t": true, "f": false, "z": null}',
    '{"esc": "a\\"b\\\\c\\/d\\n\\t\\u00e9\\ud83d\\ude80\\u0001", "raw": "你好 🚀"}',
    '[{"a": {"b": [{"c": "d"}]}}, "x", 2]',
    '{"lone": "\\ud800x", "pair_then": "\\ud83d\\ude80\\ud83d"}',
    '{}',
]


def _cuts(text: str, rng: random.Random) -> list[str]:
    points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


@pytest.mark.parametrize("text", CASES)
def test_fragments_add_up_to_the_dumped_value(text: str) -> None:
    expected = json.dumps(json.loads(text), ensure_ascii=False)
    rng = random.Random(text)
    for _ in range(30):
        rewriter = JsonRewriter()
        got = "".join(rewriter.feed(piece) for piece in _cuts(text + '}\n', rng))  # the call's own "}" after it
        assert got == expected and rewriter.done


def test_other_values_are_held_and_bad_json_stops_the_output() -> None:
    for start in ('"{\\"a\\": 1}"', "null", "3"):
        rewriter = JsonRewriter()
        assert rewriter.feed(start) == "" and rewriter.held
    rewriter = JsonRewriter()
    assert rewriter.feed('{"a": 1, oops') == '{"a": 1, ' and rewriter.broken
    assert rewriter.feed('"b": 2}') == ""


def _stream(text: str, step: int) -> tuple[dict[int, list[str]], str]:
    from qwenstack.serving.parsers import ChatOutputParser

    parser = ChatOutputParser(tools_enabled=True, stream_arguments=True)
    fragments: dict[int, list[str]] = {}
    content = ""
    for delta in [parser.feed(text[i:i + step]) for i in range(0, len(text), step)] + [parser.finish()]:
        content += delta.content
        for call in delta.tool_calls:
            fragments.setdefault(call.index, []).append(call.arguments)
    return fragments, content


def test_the_parser_streams_arguments_that_add_up_to_the_parsed_call() -> None:
    from qwenstack.serving.parsers import parse_chat_output

    text = ('Sure.<tool_call>\n{"name": "save", "arguments": {"text": "a note, </tool_call> written", "n": 1.50}}'
            '\n</tool_call>\n<tool_call>\n{"name": "ping", "arguments": null}\n</tool_call>'
            '\n<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>')
    whole = parse_chat_output(text, tools_enabled=True)
    for step in (1, 3, 7):
        fragments, content = _stream(text, step)
        assert content == whole.content == "Sure."
        assert ["".join(fragments[c.index]) for c in whole.tool_calls] == [c.arguments for c in whole.tool_calls]
        assert len([f for f in fragments[0] if f]) > 3  # the first call's arguments came in pieces
    # Announced, then malformed (cut off): still a call, with the arguments sent so far.
    fragments, content = _stream('<tool_call>\n{"name": "save", "arguments": {"text": "cut', 4)
    assert content == "" and "".join(fragments[0]) == '{"text": "cut'
