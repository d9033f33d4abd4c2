"""Structured output (qwenstack.engine.grammar): which token paths the processors allow, and sampling from a
tiny random Qwen3 at temperature 1.0 that still always yields valid JSON and well-formed tool calls."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoints import write_tokenizer
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.llm import LLM
from qwenstack.engine import grammar as structured
from qwenstack.serving.parsers import parse_chat_output
from qwenstack.engine.grammar import (
    AnswerFormat, StructuredOutputError, make_answer_processor, make_json_processor, make_tool_call_processor,
    make_tool_call_or_answer_processor,
)
from qwenstack.tokenizer import Tokenizer

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color"], "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer"},
    "color": {"enum": ["red", "green", "blue"]}}}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: any object
]
MODEL_VOCAB = 512  # the tiny checkpoints' lm_head rows; the tokenizer has fewer entries


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return Tokenizer.from_dir(path)


def follow(processor: Any, tokenizer: Tokenizer, text: str) -> tuple[str, list[bool]]:
    """Feeds text's tokens as if sampled: the longest allowed prefix, and whether eos was allowed before each
    token and after the last."""
    out: list[int] = []
    eos = tokenizer.eos_token_ids[0]
    eos_allowed = []
    for token in tokenizer.encode(text):
        row = processor(out, torch.zeros(MODEL_VOCAB))
        eos_allowed.append(not torch.isinf(row[eos]).item())
        if torch.isinf(row[token]):
            return tokenizer.decode(out), eos_allowed
        out.append(token)
    eos_allowed.append(not torch.isinf(processor(out, torch.zeros(MODEL_VOCAB))[eos]).item())
    return tokenizer.decode(out), eos_allowed


def accepts(processor: Any, tokenizer: Tokenizer, text: str) -> bool:
    prefix, eos_allowed = follow(processor, tokenizer, text)
    return prefix == text and eos_allowed[-1]


def test_json_schema_paths(tokenizer: Tokenizer) -> None:
    good = '{"name": "Ada", "age": 36, "color": "green"}'
    assert accepts(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, good)
    for bad in ('{"name": "Ada", "age": 36}', '{"name": "Ada", "age": "36", "color": "green"}',
                '{"name": "Ada", "age": 36, "color": "pink"}',
                '{"name": "Ada Lovelace Byron", "age": 1, "color": "red"}',
                '{"name": "Ada", "age": 36, "color": "red", "x": 1}', '[1]'):
        assert not accepts(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, bad), bad
    _, eos_allowed = follow(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, good)
    assert eos_allowed[-1] and not any(eos_allowed[:-1])  # eos only once the object is complete
    bare = {"type": "json_schema", "schema": PERSON}  # llama.cpp's shorthand
    assert accepts(make_json_processor(tokenizer, bare), tokenizer, good)


def test_json_object_paths(tokenizer: Tokenizer) -> None:
    for text in ('{"a": [1, 2.5, null], "b": {"c": "x\\ny"}}', "{}"):
        assert accepts(make_json_processor(tokenizer, {"type": "json_object"}), tokenizer, text)
    for text in ("[1, 2]", '"s"', "42", ' {"a": 1}', '{"a": 1} {'):
        assert not accepts(make_json_processor(tokenizer, {"type": "json_object"}), tokenizer, text)


def test_special_tokens_and_padding_are_masked(tokenizer: Tokenizer) -> None:
    proc = make_json_processor(tokenizer, {"type": "json_object"})
    out = tokenizer.encode('{"a": "')
    for i in range(len(out) + 1):
        row = proc(out[:i], torch.zeros(MODEL_VOCAB))
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert torch.isinf(row[im_start]) and torch.isinf(row[tokenizer.vocab_size:]).all()
    assert not torch.isinf(row[tokenizer.encode("hello")[0]])  # any text inside a string


def test_thinking_block_before_json(tokenizer: Tokenizer) -> None:
    text = '<think>\nLet me see.\n</think>\n\n{"a": 1}'
    assert not accepts(make_json_processor(tokenizer, {"type": "json_object"}), tokenizer, text)
    assert accepts(make_json_processor(tokenizer, {"type": "json_object"}, thinking=True), tokenizer, text)
    assert accepts(make_json_processor(tokenizer, {"type": "json_object"}, thinking=True), tokenizer, '{"a": 1}')
    prefilled = make_json_processor(tokenizer, {"type": "json_object"}, starts_in_reasoning=True)
    assert accepts(prefilled, tokenizer, 'Let me see.\n</think>\n\n{"a": 1}')
    # Qwen3's "\n\n" after </think> and no more: a small model otherwise pads every answer with newlines.
    assert accepts(make_json_processor(tokenizer, {"type": "json_object"}, thinking=True), tokenizer,
                   '<think>\n</think>\n{"a": 1}')
    assert not accepts(make_json_processor(tokenizer, {"type": "json_object"}, thinking=True), tokenizer,
                       '<think>\n</think>\n\n\n{"a": 1}')


def test_tool_call_paths(tokenizer: Tokenizer) -> None:
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert accepts(make_tool_call_processor(tokenizer, TOOLS, "required"), tokenizer, weather)
    assert accepts(make_tool_call_processor(tokenizer, TOOLS, "required"), tokenizer, time_call)
    assert accepts(make_tool_call_processor(tokenizer, TOOLS, named), tokenizer, weather)
    assert not accepts(make_tool_call_processor(tokenizer, TOOLS, named), tokenizer, time_call)
    assert not accepts(make_tool_call_processor(tokenizer, TOOLS, "required"), tokenizer,
                       weather.replace('"Paris"', "3"))
    both = weather + "\n" + time_call
    assert not accepts(make_tool_call_processor(tokenizer, TOOLS, "required"), tokenizer, both)
    assert accepts(make_tool_call_processor(tokenizer, TOOLS, "required", parallel_tool_calls=True), tokenizer, both)
    # A named function is called once, as OpenAI's forced call, whatever parallel_tool_calls says.
    assert not accepts(make_tool_call_processor(tokenizer, TOOLS, named, parallel_tool_calls=True), tokenizer,
                       weather + "\n" + weather)
    assert accepts(make_tool_call_processor(tokenizer, TOOLS, named, thinking=True), tokenizer,
                   "<think>\nweather\n</think>\n\n" + weather)
    # Arguments are an object even where the schema says nothing (`{}`, `true`): a forced call's arguments
    # were any JSON value, a string among them.
    for params in ({}, True, {"description": "no arguments"}):
        open_tool = [{"type": "function", "function": {"name": "ping", "parameters": params}}]
        call = '<tool_call>\n{"name": "ping", "arguments": %s}\n</tool_call>'
        assert accepts(make_tool_call_processor(tokenizer, open_tool, "required"), tokenizer, call % '{"a": 1}')
        for bad in ('"hello"', "[1]", "3"):
            assert not accepts(make_tool_call_processor(tokenizer, open_tool, "required"), tokenizer, call % bad)


def test_tool_calls_or_an_answer_in_the_format(tokenizer: Tokenizer) -> None:
    """tool_choice auto with a response_format (OpenAI lets the model choose): calls to any tool, or the answer."""
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    answer = '{"name": "Ada", "age": 36, "color": "green"}'

    def either(**options: Any) -> Any:
        return make_tool_call_or_answer_processor(tokenizer, TOOLS, AnswerFormat("json_schema", PERSON), **options)

    for text in (weather, time_call, answer):
        assert accepts(either(), tokenizer, text), text
    for bad in ("Hello", weather.replace('"Paris"', "3"), '{"name": "Ada"}', weather + "\n" + answer,
                weather + "\n" + time_call):
        assert not accepts(either(), tokenizer, bad), bad
    assert accepts(either(parallel_tool_calls=True), tokenizer, weather + "\n" + time_call)
    assert accepts(either(thinking=True), tokenizer, "<think>\nhm\n</think>\n\n" + answer)
    assert accepts(either(thinking=True), tokenizer, "<think>\nhm\n</think>\n\n" + weather)


def test_schema_strictness_and_strings(tokenizer: Tokenizer) -> None:
    def fmt(schema: Any) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}

    declared = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert accepts(make_json_processor(tokenizer, fmt(declared)), tokenizer, '{"a": 1}')
    assert not accepts(make_json_processor(tokenizer, fmt(declared)), tokenizer, '{"a": 1, "b": 2}')  # undeclared
    assert accepts(make_json_processor(tokenizer, fmt({"type": "object"})), tokenizer, '{"b": 2}')  # any object
    assert not accepts(make_json_processor(tokenizer, fmt({"type": "array", "prefixItems": [{"type": "integer"}]})),
                       tokenizer, "[1, 2]")
    short = {"type": "string", "maxLength": 5}
    assert accepts(make_json_processor(tokenizer, fmt(short)), tokenizer, '"a\\nb"')  # an escape is one character
    assert not accepts(make_json_processor(tokenizer, fmt(short)), tokenizer, '"a\tb"')  # raw control character
    assert accepts(make_json_processor(tokenizer, fmt({"type": "string"})), tokenizer, '"\\u00e9"')


def test_processor_replays_a_list_that_is_not_its_continuation(tokenizer: Tokenizer) -> None:
    proc = make_json_processor(tokenizer, {"type": "json_object"})
    first = tokenizer.encode('{"a": 1}')
    proc(first, torch.zeros(MODEL_VOCAB))
    row = proc(tokenizer.encode("{"), torch.zeros(MODEL_VOCAB))  # shorter: another sequence, replayed
    assert not torch.isinf(row[tokenizer.encode('"')[0]])


def test_compiled_grammars_are_cached(tokenizer: Tokenizer) -> None:
    a = make_json_processor(tokenizer, PERSON_FORMAT)
    size = len(structured._cache_for(tokenizer).compiled)
    b = make_json_processor(tokenizer, {"type": "json_schema", "json_schema": {"name": "other", "schema": PERSON}})
    c = make_json_processor(tokenizer, PERSON_FORMAT, thinking=True)
    assert a is not b and a.compiled is b.compiled and c.compiled is not a.compiled  # type: ignore[attr-defined]
    assert len(structured._cache_for(tokenizer).compiled) == size + 1


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema"}, "needs json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}, "bogus"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{not json"}}, "not valid JSON"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}, "JSON Schema object"),
    ({"type": "text"}, "needs none"),
    ({"type": "yaml"}, "cannot be enforced"),
])
def test_invalid_response_formats_are_request_errors(tokenizer: Tokenizer, response_format: dict, message: str) -> None:
    with pytest.raises(StructuredOutputError, match=message) as info:
        make_json_processor(tokenizer, response_format)
    assert isinstance(info.value, RequestError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)  # one line: no grammar source or caret drawings


@pytest.mark.parametrize("tools, tool_choice, message", [
    (TOOLS, "auto", "needs no grammar"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    ([], "required", "non-empty tools"),
    ([{"type": "function"}], "required", r"tools\[0\]"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}], "required", "bogus"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "required",
     r"tools\[0\]\.function\.parameters must be a schema of type 'object', got type 'string'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "any"}}}}}],
     "required", "function 'f': invalid schema: .*any"),  # which of the tools
])
def test_invalid_tool_choices_are_request_errors(tokenizer: Tokenizer, tools: list, tool_choice: Any,
                                                 message: str) -> None:
    with pytest.raises(StructuredOutputError, match=message):
        make_tool_call_processor(tokenizer, tools, tool_choice)


def valid_person(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"name", "age", "color"}
            and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["age"], int) and value["color"] in ("red", "green", "blue"))


@pytest.fixture(scope="module")
def llm(tiny_qwen3: Path) -> LLM:
    return LLM(tiny_qwen3, dtype="float32", device="cpu", kv_cache_memory=2**22)


def sample(llm: LLM, make_processors: Any, seeds: range, max_tokens: int = 160) -> list[Any]:
    tok = llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "JSON, please."}], enable_thinking=False))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, logits_processors=make_processors())
              for s in seeds]
    outs = [o.outputs[0] for o in llm.generate([prompt] * len(params), params)]
    assert all(o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    return outs


def test_random_model_always_matches_the_schema(llm: LLM) -> None:
    outs = sample(llm, lambda: [make_json_processor(llm.tokenizer, PERSON_FORMAT)], range(4))
    for out in outs:
        assert valid_person(json.loads(out.text)), out.text
    assert len({o.text for o in outs}) == len(outs)  # really sampled


def test_one_processor_serves_n_samples_and_many_prompts(llm: LLM, caplog: pytest.LogCaptureFixture) -> None:
    """One processor object in one SamplingParams, for n = 3 samples of each of 2 prompts: the engine forks each
    sequence its own, so every sample holds to the schema and draws what it draws alone (seed + i)."""
    tok = llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "JSON, please."}], enable_thinking=False))
    shared = SamplingParams(temperature=1.0, seed=10, n=3, max_tokens=160,
                            logits_processors=[make_json_processor(tok, PERSON_FORMAT)])
    with caplog.at_level(logging.WARNING, logger="qwenstack.structured"):
        outs = llm.generate([prompt, prompt], shared)
    assert not [r for r in caplog.records if "breaks" in r.getMessage()]
    texts = [[o.text for o in out.outputs] for out in outs]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3
    for text in texts[0]:
        assert valid_person(json.loads(text)), text
    assert texts[0] == [o.text for o in sample(llm, lambda: [make_json_processor(tok, PERSON_FORMAT)], range(10, 13))]

    class Recorder:
        """A stateful processor: each fork must see one sequence's output grow a token a call."""
        forks: list["Recorder"] = []

        def __init__(self) -> None:
            self.seen: list[int] = []

        def fork(self) -> "Recorder":
            Recorder.forks.append(Recorder())
            return Recorder.forks[-1]

        def __call__(self, output: list[int], logits: torch.Tensor) -> torch.Tensor:
            assert output[:len(self.seen)] == self.seen and len(output) == len(self.seen) + 1 or not self.seen
            self.seen = list(output)
            return logits

    llm.generate([prompt, prompt], SamplingParams(temperature=1.0, n=3, max_tokens=8, ignore_eos=True,
                                                  logits_processors=[Recorder()]))
    assert len(Recorder.forks) == 6 and all(len(r.seen) == 7 for r in Recorder.forks)


def closer_bias(llm: LLM) -> Any:
    """A random model rarely closes a string or an object; a bias towards tokens with '"', '}' or ']' (applied
    before the grammar processor) keeps outputs short. The grammar alone decides what is allowed."""
    closers = torch.tensor([3.0 if any(c in llm.tokenizer.decode([i]) for c in '"}]') else 0.0
                            for i in range(MODEL_VOCAB)])
    return lambda out, logits: logits + closers


def test_random_model_json_object(llm: LLM) -> None:
    bias = closer_bias(llm)
    outs = sample(llm, lambda: [bias, make_json_processor(llm.tokenizer, {"type": "json_object"})], range(3))
    for out in outs:
        assert isinstance(json.loads(out.text), dict), out.text


def test_random_model_tool_calls(llm: LLM) -> None:
    # get_time takes any object, which a random model may not close within max_tokens: the closer bias again.
    named = {"type": "function", "function": {"name": "get_weather"}}
    bias = closer_bias(llm)
    for choice, names in (("required", {"get_weather", "get_time"}), (named, {"get_weather"})):
        outs = sample(llm, lambda: [bias, make_tool_call_processor(llm.tokenizer, TOOLS, choice)], range(3))
        for out in outs:
            message = parse_chat_output(out.text, tools_enabled=True)
            assert len(message.tool_calls) == 1 and message.content is None, out.text
            call = message.tool_calls[0]
            arguments = json.loads(call.arguments)
            assert call.name in names and isinstance(arguments, dict)
            if call.name == "get_weather":
                assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 10


def test_whitespace_is_compact_unless_a_pattern_relaxes_it(tokenizer: Tokenizer) -> None:
    compact = '{"name": "Ann", "age": 3, "color": "red"}'
    pretty = '{\n  "name": "Ann",\n  "age": 3,\n  "color": "red"\n}'
    assert accepts(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, compact)
    assert not accepts(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, pretty)
    assert not accepts(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, compact.replace(", ", ",\n"))
    relaxed = make_json_processor(tokenizer, PERSON_FORMAT, whitespace_pattern="[ \\n]*")
    assert accepts(relaxed, tokenizer, pretty)
    any_object = {"type": "json_object"}  # json_object: the same compact default, the same relaxing
    assert accepts(make_json_processor(tokenizer, any_object), tokenizer, '{"a": [1, 2], "b": {"c": null}}')
    for loose in ('{"a": [1,2]}', '{"a":1}', '{ "a": 1}', '{"a": 1}\n', '{\n"a": 1}', '{"a": [1, 2 ]}'):
        assert not accepts(make_json_processor(tokenizer, any_object), tokenizer, loose), loose
    assert accepts(make_json_processor(tokenizer, any_object, whitespace_pattern="[ \\n]*"), tokenizer,
                   '{\n  "a": [\n    1,\n    2\n  ]\n}')
    # An integer without bounds is bounded to I-JSON's range: no endless digits.
    assert accepts(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, compact.replace("3", "9007199254740991"))
    assert not accepts(make_json_processor(tokenizer, PERSON_FORMAT), tokenizer, compact.replace("3", "9" * 17))
    tool = make_tool_call_processor(tokenizer, TOOLS[:1], "required")
    assert accepts(tool, tokenizer, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    tool = make_tool_call_processor(tokenizer, TOOLS[:1], "required")
    assert not accepts(tool, tokenizer, '<tool_call>\n{"name": "get_weather", "arguments": {\n"city": "Paris"}}\n</tool_call>')


def answer(tokenizer: Tokenizer, kind: str, spec: Any, **options: Any) -> Any:
    return make_answer_processor(tokenizer, AnswerFormat(kind, spec), **options)  # type: ignore[arg-type]


def test_regex_choice_and_grammar_paths(tokenizer: Tokenizer) -> None:
    # A regex must match the whole answer; anchors change nothing.
    for pattern in ("[0-9]{3}-[a-z]{2}", "^[0-9]{3}-[a-z]{2}$"):
        assert accepts(answer(tokenizer, "regex", pattern), tokenizer, "123-ab")
        for bad in ("123-a", "123-abc", "12-ab", " 123-ab", "123-ab\n"):
            assert not accepts(answer(tokenizer, "regex", pattern), tokenizer, bad), (pattern, bad)
    # A choice is one of its strings exactly (any characters: they are literals, not patterns).
    choices = ["yes", "no", "a.b*", "été"]
    for text in choices:
        assert accepts(answer(tokenizer, "choice", choices), tokenizer, text)
    for bad in ("ye", "yes!", "axb", "No"):
        assert not accepts(answer(tokenizer, "choice", choices), tokenizer, bad), bad
    # A grammar in GBNF (llama.cpp's, root) or Lark (start): the same language.
    gbnf = 'root ::= "ab" | "cd" digit+\ndigit ::= [0-9]'
    lark = 'start: "ab" | "cd" DIGITS\nDIGITS: /[0-9]+/'
    inlined = '?start: pair\n?pair: "ab" | "cd" DIGITS  // Lark\'s inlined rules, no `start:` line\nDIGITS: /[0-9]+/'
    for grammar in (gbnf, lark, inlined):
        for text in ("ab", "cd1", "cd42"):
            assert accepts(answer(tokenizer, "grammar", grammar), tokenizer, text), (grammar, text)
        for bad in ("abcd", "cd", "cdx", "ab1"):
            assert not accepts(answer(tokenizer, "grammar", grammar), tokenizer, bad), (grammar, bad)
    # With thinking, a leading think block first, as for JSON.
    assert accepts(answer(tokenizer, "choice", choices, thinking=True), tokenizer, "<think>\nhm\n</think>\n\nno")
    assert not accepts(answer(tokenizer, "choice", choices), tokenizer, "<think>\nhm\n</think>\n\nno")


@pytest.mark.parametrize("kind, spec, message", [
    ("regex", "(", "invalid regex '\\(': unclosed group"),
    ("regex", "(?=a)b", "look-around"),
    ("regex", "", "non-empty string"),
    ("choice", [], "non-empty list"),
    ("choice", ["a", ""], "non-empty list"),
    ("choice", "yes", "non-empty list"),
    ("grammar", "root ::= (", "invalid grammar"),
    ("grammar", "start: undefined_rule", "unknown name"),
    ("grammar", "root ::= root", "no output can match it"),  # compiles, then fails at its first token
    ("grammar", "  ", "non-empty"),
])
def test_invalid_answer_formats_are_request_errors(tokenizer: Tokenizer, kind: str, spec: Any, message: str) -> None:
    with pytest.raises(StructuredOutputError, match=message) as info:
        answer(tokenizer, kind, spec)
    assert isinstance(info.value, RequestError) and "\n" not in str(info.value)


def test_random_model_holds_to_a_regex_and_a_choice(llm: LLM) -> None:
    import re

    outs = sample(llm, lambda: [answer(llm.tokenizer, "regex", "[a-f]{2,4}-[0-9]{1,3}")], range(4))
    assert all(re.fullmatch("[a-f]{2,4}-[0-9]{1,3}", o.text) for o in outs), [o.text for o in outs]
    outs = sample(llm, lambda: [answer(llm.tokenizer, "choice", ["north", "south", "east"])], range(4))
    assert all(o.text in ("north", "south", "east") for o in outs), [o.text for o in outs]
