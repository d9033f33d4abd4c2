"""Structured output in every spelling clients send, on /v1/chat/completions and /v1/completions: OpenAI's
response_format, vLLM's structured_outputs and guided_* fields, llama.cpp's grammar and json_schema. Each is
driven through the official `openai` SDK's extra_body (as vLLM's docs show), against the bundled demo model, which
writes Shakespeare unconstrained: every answer below holds only because the grammar held it.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

import jsonschema
import openai
import pytest

from server_utils import BackgroundServer, tiny_served_model
from qwenstack.llm import DEMO_MODEL_DIR
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"word": {"enum": ["ay", "nay"]}, "n": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 99}},
          "required": ["word", "n"]}
REGEX = "[0-9]{3}-[a-z]{2}"
CHOICES = ["Verona", "Mantua", "Padua"]
GBNF = 'root ::= "To " verb " or not to " verb\nverb ::= "be" | "sing"'
LARK = 'start: "To " VERB " or not to " VERB\nVERB: "be" | "sing"'
# Lark as outlines' CFG type sends it (vLLM server backend, structured_outputs.grammar): `?start` inlines the start
# rule, with a common terminal imported; no `start:` line for a test that looks for one to find.
LARK_INLINED = '\n?start: sentence\n?sentence: "To " verb " or not to " verb\nverb: "be" | "sing"\n%import common.WS\n'
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def is_valid(kind: str, text: str) -> bool:
    if kind == "json":
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch("To (be|sing) or not to (be|sing)", text) is not None


SPELLINGS = [  # (what the request adds, which check its answer passes)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}}, "json"),
    ({"response_format": {"type": "json_object", "schema": SCHEMA}}, "json"),  # llama.cpp's shorthand
    ({"structured_outputs": {"json": SCHEMA}}, "json"),
    ({"structured_outputs": {"regex": REGEX}}, "regex"),
    ({"structured_outputs": {"choice": CHOICES}}, "choice"),
    ({"structured_outputs": {"grammar": GBNF}}, "grammar"),
    ({"guided_json": SCHEMA}, "json"),
    ({"guided_json": json.dumps(SCHEMA)}, "json"),  # vLLM also takes the schema as a JSON string
    ({"guided_regex": REGEX}, "regex"),
    ({"guided_choice": CHOICES}, "choice"),
    ({"guided_grammar": LARK}, "grammar"),
    ({"structured_outputs": {"grammar": LARK_INLINED}}, "grammar"),
    ({"grammar": GBNF}, "grammar"),  # llama.cpp
    ({"json_schema": SCHEMA}, "json"),  # llama.cpp
]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    app = create_app([tiny_served_model(DEMO_MODEL_DIR, "demo")], ServerConfig(enable_ui=False))
    with BackgroundServer(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("extra, kind", SPELLINGS, ids=[next(iter(e)) + "-" + k for e, k in SPELLINGS])
def test_every_spelling_holds_the_answer_on_both_routes(client: openai.OpenAI, extra: dict, kind: str) -> None:
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=60, seed=1, extra_body={**NO_THINKING, **extra})
    text = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=60, seed=1, n=2,
                                     extra_body=extra)
    answers = [chat.choices[0].message.content] + [c.text for c in text.choices]
    assert all(is_valid(kind, a) for a in answers), answers
    assert chat.choices[0].finish_reason == "stop" and all(c.finish_reason == "stop" for c in text.choices)


def test_free_text_is_not_held(client: openai.OpenAI) -> None:
    """The control: without a constraint the demo model's answers pass none of the checks."""
    text = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=30, seed=1).choices[0].text
    assert not any(is_valid(kind, text) for kind in ("json", "regex", "choice", "grammar")), text


def test_the_answer_is_held_after_the_thinking(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Where?"}],
                                           max_tokens=120, seed=3, extra_body={"guided_choice": CHOICES})
    assert reply.choices[0].message.content in CHOICES, reply.choices[0].message


def test_a_streamed_answer_is_held(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Code?"}],
                                            max_tokens=30, stream=True, extra_body={**NO_THINKING, "guided_regex": REGEX})
    assert re.fullmatch(REGEX, "".join(c.choices[0].delta.content or "" for c in stream if c.choices))


@pytest.mark.parametrize("extra, param, message", [
    ({"guided_regex": "[0-9]", "guided_choice": ["a"]}, "guided_choice", "one structured output constraint"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex",
     "response_format, structured_outputs.regex"),
    ({"guided_regex": "("}, "guided_regex", "invalid regex '\\(': unclosed group"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "invalid grammar"),
    ({"guided_grammar": "root ::= root"}, "guided_grammar", "no output can match it"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"json_schema": {"type": "bogus"}}, "json_schema", "bogus"),
])
def test_bad_constraints_are_400s_that_name_the_field(client: openai.OpenAI, extra: dict, param: str,
                                                       message: str) -> None:
    for call in (lambda: client.completions.create(model="demo", prompt="x", max_tokens=5, extra_body=extra),
                 lambda: client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=5, extra_body=extra)):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        error: Any = info.value.body
        assert error["param"] == param and re.search(message, error["message"]), error


ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_forced_call_cut_by_max_tokens_is_still_a_call(client: openai.OpenAI, choice: Any) -> None:
    """OpenAI's shape for a call the limit cut (what pydantic-ai and the SDK's helpers expect): the call as far as it
    got in tool_calls and finish_reason "length", never its markup in content; streamed, one entry per call a
    chunk, and the fragments join to the same arguments."""
    kwargs: dict[str, Any] = dict(model="demo", messages=[{"role": "user", "content": "Add."}], tools=[ADD],
                                  tool_choice=choice, max_tokens=24, extra_body=NO_THINKING)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "length" and not whole.message.content
    (call,) = whole.message.tool_calls
    assert call.function.name == "add" and call.function.arguments and call.function.arguments.startswith("{")
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)  # cut: not whole JSON
    arguments, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        assert not delta.content
        calls = delta.tool_calls or []
        assert len({c.index for c in calls}) == len(calls)
        arguments += "".join(c.function.arguments or "" for c in calls)
        finish = chunk.choices[0].finish_reason or finish
    assert (arguments, finish) == (call.function.arguments, "length")


CITY = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city.",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"enum": ["Paris", "Rome"], "type": "string"}},
                                             "required": ["city"]}}}
OUTPUTS = {"type": "json_schema", "json_schema": {"name": "DSPyProgramOutputs", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "title": "DSPyProgramOutputs", "required": ["answer"],
    "properties": {"answer": {"enum": ["four", "five"], "title": "Answer", "type": "string"}}}}}


def _call_or_answer(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, list[str], str | None]:
    """(content, each call's arguments, finish_reason) of one chat request, streamed or not."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [c.function.arguments for c in choice.message.tool_calls or []]
        return choice.message.content or "", calls, choice.finish_reason
    content, arguments, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    return content, list(arguments.values()), finish


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tools_with_a_format_may_call_or_answer(client: openai.OpenAI, stream: bool) -> None:
    """DSPy's JSONAdapter with tools in the signature sends tools (tool_choice left auto) and a strict
    response_format together, as the Agents SDK does for an agent with tools and an output_type. OpenAI lets the
    model call a tool or answer in the format; the format alone had ruled every call out (the demo model, pushed
    toward `<tool_call>` by logit_bias, still answered JSON). Both ways out now hold to their schemas."""
    tool_call = Tokenizer.from_dir(DEMO_MODEL_DIR).encode("<tool_call>")
    assert len(tool_call) == 1
    kwargs: dict[str, Any] = dict(model="demo", messages=[{"role": "user", "content": "What is 2+2, in Paris?"}],
                                  tools=[CITY], response_format=OUTPUTS, max_tokens=80, seed=5,
                                  extra_body=NO_THINKING)
    # One call: the bias would otherwise open another after each, until max_tokens.
    content, calls, finish = _call_or_answer(client, stream, logit_bias={str(tool_call[0]): 10},
                                             parallel_tool_calls=False, **kwargs)
    assert len(calls) == 1 and not content and finish == "tool_calls", (content, calls, finish)
    assert all(json.loads(a)["city"] in ("Paris", "Rome") for a in calls), calls
    content, calls, finish = _call_or_answer(client, stream, **kwargs)
    assert not calls and finish == "stop" and json.loads(content)["answer"] in ("four", "five"), content


@pytest.mark.parametrize("parameters", [{}, {"description": "no arguments"}])
def test_a_forced_call_to_a_tool_with_an_open_schema_has_object_arguments(client: openai.OpenAI,
                                                                          parameters: dict) -> None:
    """A parameters schema that leaves the type open admitted any JSON value: the demo model's forced call came
    back with a string for arguments, which a client cannot splat into its function."""
    tool = {"type": "function", "function": {"name": "ping", "parameters": parameters}}
    for seed in range(3):
        choice = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Ping."}], tools=[tool], tool_choice="required",
            parallel_tool_calls=False, max_tokens=60, seed=seed, extra_body=NO_THINKING).choices[0]
        (call,) = choice.message.tool_calls
        assert call.function.arguments.startswith("{"), call.function.arguments
        if choice.finish_reason == "tool_calls":
            assert isinstance(json.loads(call.function.arguments), dict)


def test_a_tool_schema_of_another_type_is_a_400_naming_it(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "ping", "parameters": {"type": "string"}}}
    with pytest.raises(openai.BadRequestError, match="must be a schema of type 'object'"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Ping."}], tools=[tool],
                                       tool_choice="required", max_tokens=5)
