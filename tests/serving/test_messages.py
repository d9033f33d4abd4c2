"""/v1/messages (Anthropic's Messages API) through the official anthropic SDK, against scripted checkpoints served
by the real engine."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import anthropic
import httpx
import jsonschema
import pytest

from responses_fixtures import AGENT_ANSWER, THINK_ANSWER, chat_api_models
from scripted import _answer, build_scripted_checkpoint
from server_utils import BackgroundServer, fail_after_first_output, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import RemoteSpec, ServerConfig
from qwenstack.serving.messages import translate
from qwenstack.serving.messages.protocol import MessagesRequest

KEY = "sk-messages-test"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# A schema the grammar can only fill one way: the forced call's input is complete and valid.
TIME = {"name": "get_time", "description": "Local time in a city",
        "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                         "additionalProperties": False}}
NOTE_ARGS = {"title": "Trip", "text": "Pack the blue tent, two maps, a stove and dry socks."}
WRITER_SCRIPT = ("<think>\nThe user wants a note saved.\n</think>\n\n"
                 '<tool_call>\n{"name": "save_note", "arguments": ' + json.dumps(NOTE_ARGS) + "}\n</tool_call>")
NOTE = {"name": "save_note", "description": "Save a note",
        "input_schema": {"type": "object", "properties": {"title": {"type": "string"}, "text": {"type": "string"}}}}
HELLO = [{"role": "user", "content": "Hello there"}]
THOUGHT = "The user says hello. A short, friendly greeting fits."
ANSWER = _answer(THINK_ANSWER)  # "Hello! How can I help you today?"
GREEDY = {"temperature": 0}  # this SDK has no sampling arguments any more; older clients (and the API) send them


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("messages")
    writer = build_scripted_checkpoint(root / "writer", WRITER_SCRIPT)
    models = [*chat_api_models(root, tiny_qwen3), tiny_served_model(writer.path, "writer")]
    app = create_app(models, ServerConfig(api_key=KEY, enable_ui=False))
    with BackgroundServer(app) as srv:
        srv.models = {m.name: m for m in models}
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def create(client: anthropic.Anthropic, **kwargs: Any) -> anthropic.types.Message:
    kwargs.setdefault("model", "think")
    kwargs.setdefault("max_tokens", 200)
    kwargs.setdefault("messages", HELLO)
    return client.messages.create(extra_body={**GREEDY, **kwargs.pop("extra_body", {})}, **kwargs)


def blocks(message: Any) -> list[dict[str, Any]]:
    return [b.model_dump(exclude_none=True) for b in message.content]


def test_models_in_anthropics_shape_for_its_clients(client: anthropic.Anthropic, server: BackgroundServer) -> None:
    """The SDK sends anthropic-version on every call: /v1/models answers it in the Models API's shape (and its
    errors in Anthropic's), an OpenAI client still gets OpenAI's list."""
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert set(ids) == set(server.models) and page.has_more is False
    assert (page.first_id, page.last_id) == (ids[0], ids[-1])
    think = client.models.retrieve("think")
    assert (think.type, think.id, think.display_name) == ("model", "think", "think")
    assert think.created_at.year >= 2024
    with pytest.raises(anthropic.NotFoundError) as info:
        client.models.retrieve("nobody")
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"
    openai_shape = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert openai_shape["object"] == "list" and {m["id"] for m in openai_shape["data"]} == set(ids)


def test_plain_text(client: anthropic.Anthropic) -> None:
    m = create(client)
    assert (m.type, m.role, m.model, m.stop_reason, m.stop_sequence) == ("message", "assistant", "think", "end_turn",
                                                                         None)
    assert m.id.startswith("msg_") and blocks(m) == [{"type": "text", "text": ANSWER}]  # no thinking unless asked
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0


def test_system_prompt_as_string_or_blocks(client: anthropic.Anthropic) -> None:
    bare = client.messages.count_tokens(model="think", messages=HELLO).input_tokens
    text = client.messages.count_tokens(model="think", messages=HELLO, system="Be brief.\nBe kind.").input_tokens
    parts = client.messages.count_tokens(model="think", messages=HELLO, system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cch=5f2e1;"},  # Claude Code's
        {"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {
            "type": "ephemeral"}}]).input_tokens
    assert text == parts > bare  # text blocks join one per line; the billing line (a per-request hash) is dropped
    m = create(client, system=[{"type": "text", "text": "Be brief."}])
    assert m.content[0].text == ANSWER and m.usage.input_tokens > bare


def test_a_last_assistant_message_is_a_prefill_the_answer_continues(server: BackgroundServer,
                                                                   client: anthropic.Anthropic) -> None:
    """Anthropic's prefill: the model goes on from the assistant's text (chat's continue_final_message), and the
    response holds only what follows it."""
    prefill = [*HELLO, {"role": "assistant", "content": "Hello, Paris"}]
    m = create(client, model="tiny", max_tokens=12, messages=prefill)
    chat = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "tiny", "messages": prefill, "max_tokens": 12, "temperature": 0, "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert m.content[0].text == chat["choices"][0]["message"]["content"]
    assert m.usage.input_tokens == chat["usage"]["prompt_tokens"] == client.messages.count_tokens(
        model="tiny", messages=prefill).input_tokens
    assert m.usage.input_tokens < create(client, model="tiny", max_tokens=1, messages=[
        *prefill, {"role": "user", "content": "And?"}]).usage.input_tokens


def test_count_tokens_equals_usage(client: anthropic.Anthropic) -> None:
    for extra in ({}, {"thinking": {"type": "enabled", "budget_tokens": 1024}}, {"system": "Be brief."},
                  {"tools": [WEATHER, TIME], "tool_choice": {"type": "any"}}):
        counted = client.messages.count_tokens(model="agent", messages=HELLO, **extra).input_tokens
        assert create(client, model="agent", max_tokens=4, **extra).usage.input_tokens == counted, extra


def test_thinking_enabled_disabled_and_budgeted(client: anthropic.Anthropic) -> None:
    on = create(client, thinking={"type": "enabled", "budget_tokens": 2048})
    assert [b["type"] for b in blocks(on)] == ["thinking", "text"]
    assert on.content[0].thinking == THOUGHT and on.content[0].signature and on.content[1].text == ANSWER
    assert blocks(create(client, thinking={"type": "disabled"})) == [{"type": "text", "text": ANSWER}]
    assert [b.type for b in create(client, thinking={"type": "adaptive"}).content] == ["thinking", "text"]
    cut = create(client, thinking={"type": "enabled", "budget_tokens": 4})  # a forced close after 4 tokens
    assert THOUGHT.startswith(cut.content[0].thinking) and len(cut.content[0].thinking) < len(THOUGHT)
    assert cut.content[1].text == ANSWER and cut.usage.output_tokens < on.usage.output_tokens


def test_sampling_fields_reach_the_engine(client: anthropic.Anthropic, server: BackgroundServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.models["think"].engine
    generate, seen = engine.generate, []
    monkeypatch.setattr(engine, "generate", lambda ids, params, **kw: (seen.append(params),
                                                                       generate(ids, params, **kw))[1])
    create(client, extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 7}, metadata={"user_id": "u1"})
    assert (seen[0].temperature, seen[0].top_p, seen[0].top_k, seen[0].max_tokens) == (0.5, 0.9, 7, 200)
    with pytest.raises(anthropic.BadRequestError):  # Anthropic's range
        create(client, extra_body={"temperature": 1.5})


def test_output_config_format_and_effort(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}, "required": ["mood"],
              "additionalProperties": False}
    m = create(client, output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(m.content[0].text)["mood"] in ("happy", "sad")  # unconstrained, this model says "Hello!..."
    body = {"model": "m", "max_tokens": 5, "messages": HELLO, "thinking": {"type": "adaptive"}}

    def budget(effort: str) -> int | None:
        request = MessagesRequest.model_validate({**body, "output_config": {"effort": effort}})
        return translate.chat_request(request, False).thinking_budget_tokens

    assert (budget("low"), budget("medium"), budget("high"), budget("max")) == (1024, 8192, None, None)
    explicit = {**body, "thinking": {"type": "enabled", "budget_tokens": 99}, "output_config": {"effort": "low"}}
    assert translate.chat_request(MessagesRequest.model_validate(explicit), False).thinking_budget_tokens == 99


def test_stop_sequences_and_max_tokens(client: anthropic.Anthropic) -> None:
    m = create(client, stop_sequences=["help", "never"])
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "help")
    assert m.content[0].text == ANSWER[:ANSWER.index("help")]
    cut = create(client, max_tokens=3)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3 and ANSWER.startswith(cut.content[0].text)
    # Far more than the context holds (Claude Code asks for 32000): capped, and the context's end says so.
    full = create(client, model="short", max_tokens=32000, timeout=30)  # (a timeout: no "use streaming" refusal)
    assert full.stop_reason == "model_context_window_exceeded" and ANSWER.startswith(full.content[0].text)
    assert full.usage.input_tokens + full.usage.output_tokens == 30


def test_tool_use_then_tool_result(client: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "Weather and time in Paris?"}]
    first = create(client, model="agent", messages=question, tools=[WEATHER, TIME],
                   thinking={"type": "enabled", "budget_tokens": 1024})
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["thinking", "tool_use", "tool_use"]
    calls = first.content[1:]
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                  ("get_time", {"city": "Paris, France"})]
    assert all(c.id.startswith("toolu_") for c in calls) and calls[0].id != calls[1].id
    results = [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny, 21 C"},
               {"type": "tool_result", "tool_use_id": calls[1].id, "is_error": True,
                "content": [{"type": "text", "text": "the clock is broken"}]}]
    history = question + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                          {"role": "user", "content": results}]
    second = create(client, model="agent", messages=history, tools=[WEATHER, TIME],
                    thinking={"type": "enabled", "budget_tokens": 1024})
    assert second.stop_reason == "end_turn" and blocks(second) == [{"type": "text", "text": AGENT_ANSWER}]
    # The earlier thinking and calls reach the template as the assistant turn's reasoning and tool calls.
    chat = translate.chat_request(MessagesRequest.model_validate(
        {"model": "agent", "max_tokens": 9, "messages": history}), False)
    turn, tool_msgs = chat.messages[1], chat.messages[2:]
    assert turn.reasoning_content == "Weather and time in Paris: two calls."
    assert [c.function.arguments for c in turn.tool_calls] == [{"city": "Paris"}, {"city": "Paris, France"}]
    assert [(t.role, t.tool_call_id) for t in tool_msgs] == [("tool", calls[0].id), ("tool", calls[1].id)]
    assert tool_msgs[1].content[0].text == "Error: the clock is broken"


def test_forced_tool_gives_valid_input(client: anthropic.Anthropic) -> None:
    forced = {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}
    m = create(client, model="agent", messages=[{"role": "user", "content": "Weather and time in Paris?"}],
               tools=[WEATHER, TIME], tool_choice=forced)
    # Left alone this model calls get_weather first; the grammar makes it get_time, with an input its schema allows.
    assert m.stop_reason == "tool_use" and [(b.type, b.name) for b in m.content] == [("tool_use", "get_time")]
    jsonschema.validate(m.content[0].input, TIME["input_schema"])
    none = create(client, model="agent", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                  tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn" and [b.type for b in none.content] == ["text"]


def stream_events(client: anthropic.Anthropic, **kwargs: Any) -> tuple[list[Any], anthropic.types.Message]:
    with client.messages.stream(extra_body=GREEDY, **kwargs) as stream:
        events = list(stream)
        return events, stream.get_final_message()


@pytest.mark.parametrize("model,extra", [
    ("think", {"thinking": {"type": "enabled", "budget_tokens": 2048}}),
    ("think", {"stop_sequences": ["help"]}),
    ("agent", {"tools": [WEATHER, TIME], "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ("writer", {"tools": [NOTE], "max_tokens": 30}),  # cut off inside the arguments
    ("writer", {"tools": [NOTE], "thinking": {"type": "adaptive"}}),
])
def test_stream_reassembles_to_the_message(client: anthropic.Anthropic, model: str, extra: dict[str, Any]) -> None:
    kwargs = {"model": model, "messages": [{"role": "user", "content": "Do it"}], "max_tokens": 200, **extra}
    events, final = stream_events(client, **kwargs)
    whole = client.messages.create(extra_body=GREEDY, **kwargs)
    drop_ids = {"id": True, "content": {i: {"id"} for i in range(len(whole.content))}}
    assert final.model_dump(exclude=drop_ids) == whole.model_dump(exclude=drop_ids)
    raw = [e for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                           "content_block_stop", "message_delta", "message_stop")]
    kinds = [e.type for e in raw]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert raw[0].message.usage.input_tokens == whole.usage.input_tokens and raw[0].message.stop_reason is None
    open_block, started = None, 0  # blocks never overlap, and their indexes count up from 0
    for e in raw[1:-2]:
        if e.type == "content_block_start":
            assert open_block is None and e.index == started
            open_block, started = e.index, started + 1
        else:
            assert e.index == open_block
            open_block = None if e.type == "content_block_stop" else open_block
    assert open_block is None and started == len(whole.content)
    assert raw[-2].usage.output_tokens == whole.usage.output_tokens and raw[-2].delta.stop_reason == whole.stop_reason


def test_tool_input_streams_as_json_deltas(client: anthropic.Anthropic) -> None:
    events, final = stream_events(client, model="writer", max_tokens=200, tools=[NOTE],
                                  messages=[{"role": "user", "content": "Save a note for the trip."}])
    deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"
              and e.delta.type == "input_json_delta"]
    assert len(deltas) > 5 and json.loads("".join(deltas)) == NOTE_ARGS == final.content[-1].input
    assert final.stop_reason == "tool_use"


def error_body(exc: anthropic.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, dict) and exc.body["type"] == "error" and set(exc.body["error"]) == {"type", "message"}
    return exc.body["error"]


def test_errors_are_anthropic_shaped(client: anthropic.Anthropic, server: BackgroundServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="think", messages=HELLO, max_tokens=anthropic.omit, timeout=30)
    assert error_body(err.value)["type"] == "invalid_request_error" and "max_tokens" in err.value.message
    with pytest.raises(anthropic.BadRequestError) as err:
        create(client, messages=[{"role": "wizard", "content": "hi"}])
    assert error_body(err.value)["type"] == "invalid_request_error" and "role" in err.value.message
    with pytest.raises(anthropic.NotFoundError) as err:
        create(client, model="claude-sonnet-4-5")
    assert error_body(err.value)["type"] == "not_found_error" and "claude-sonnet-4-5" in err.value.message
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=HELLO)
    with pytest.raises(anthropic.BadRequestError) as err:  # a text-only model
        create(client, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(b"not really a png").decode()}},
            {"type": "text", "text": "What is this?"}]}])
    assert "does not accept image_url input" in error_body(err.value)["message"]
    for tools, choice in (([WEATHER], {"type": "tool", "name": "get_time"}), (None, {"type": "any"})):
        with pytest.raises(anthropic.BadRequestError):  # a tool that is not there; a forced call without tools
            create(client, tool_choice=choice, **({"tools": tools} if tools else {}))
    with pytest.raises(anthropic.BadRequestError):
        create(client, messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}])
    # A route that does not exist under the prefix, and the OpenAI routes keep OpenAI's shape.
    r = httpx.get(server.url + "/v1/messages/batches", headers={"x-api-key": KEY})
    assert r.status_code in (404, 405) and r.json()["type"] == "error"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": HELLO},
                   headers={"x-api-key": KEY})
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_api_key_as_x_api_key_or_bearer(server: BackgroundServer) -> None:
    # This SDK sends api_key as a bearer token; Claude Code sends ANTHROPIC_API_KEY as x-api-key.
    as_header = anthropic.Anthropic(base_url=server.url, auth_token=None, default_headers={"x-api-key": KEY},
                                    max_retries=0)
    assert create(as_header).content[0].text == ANSWER
    for wrong in (anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0),
                  anthropic.Anthropic(base_url=server.url, auth_token=None, default_headers={"x-api-key": "wrong"},
                                      max_retries=0)):
        with pytest.raises(anthropic.AuthenticationError) as err:
            create(wrong)
        assert error_body(err.value)["type"] == "authentication_error"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "think", "messages": HELLO})
    assert r.status_code == 401 and set(r.json()) == {"error"}


def test_error_after_the_stream_started_is_an_error_event(client: anthropic.Anthropic, server: BackgroundServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fail_after_first_output(monkeypatch, server.models["think"].engine)
    with pytest.raises(anthropic.APIStatusError) as err:
        stream_events(client, model="think", max_tokens=200, messages=HELLO)
    assert error_body(err.value) == {"type": "api_error", "message": "internal error: RuntimeError: the engine broke"}


def test_remote_model_is_forwarded(server: BackgroundServer) -> None:
    remote = RemoteSpec("far", server.url + "/v1", model="think", api_key_env="TEST_MESSAGES_KEY")
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_MESSAGES_KEY", KEY)
    try:
        with BackgroundServer(create_app([], ServerConfig(remote=[remote], enable_ui=False))) as proxy:
            via = anthropic.Anthropic(base_url=proxy.url, api_key="any", max_retries=0)
            m = create(via, model="far")
            assert blocks(m) == [{"type": "text", "text": ANSWER}]
            assert via.messages.count_tokens(model="far", messages=HELLO).input_tokens == m.usage.input_tokens
    finally:
        mp.undo()


def test_openapi_documents_anthropic_errors(server: BackgroundServer) -> None:
    doc = httpx.get(server.url + "/openapi.json", headers={"x-api-key": KEY}).json()
    op = doc["paths"]["/v1/messages"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/MessagesRequest")
    assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicErrorResponse")
    assert "text/event-stream" in op["responses"]["200"]["content"]


def test_translation_of_images_and_system_messages() -> None:
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "system": "S", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "AAAA"}},
                                     {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]},
        {"role": "system", "content": "later"}]})
    chat = translate.chat_request(body, False)
    assert [m.role for m in chat.messages] == ["system", "user", "system"]
    assert [p.image_url.url for p in chat.messages[1].content[1:]] == ["data:image/png;base64,AAAA",
                                                                       "https://x.test/a.png"]
    assert chat.chat_template_kwargs == {"enable_thinking": False} and chat.max_completion_tokens == 5
    assert translate.chat_request(body, True).chat_template_kwargs == {"enable_thinking": True}  # operator default


def test_documents_become_the_users_text(client: anthropic.Anthropic) -> None:
    """A text document (text source, inline content, base64 text/plain) is the user's text, wrapped with its
    title and context: count_tokens sees exactly that text; PDFs and URLs are 400s naming the block."""
    wrapped = '<document title="Notes">\nFrom the meeting\n\nParis is sunny.\n</document>'
    sources = [{"type": "text", "media_type": "text/plain", "data": "Paris is sunny."},
               {"type": "content", "content": [{"type": "text", "text": "Paris is sunny."}]},
               {"type": "base64", "media_type": "text/plain", "data": base64.b64encode(b"Paris is sunny.").decode()}]
    plain = client.messages.count_tokens(model="think", messages=[{"role": "user", "content": [
        {"type": "text", "text": wrapped}, {"type": "text", "text": "Weather?"}]}]).input_tokens
    for source in sources:
        doc = {"type": "document", "source": source, "title": "Notes", "context": "From the meeting"}
        counted = client.messages.count_tokens(model="think", messages=[{"role": "user", "content": [
            doc, {"type": "text", "text": "Weather?"}]}])
        assert counted.input_tokens == plain, source
    reply = client.messages.create(model="think", max_tokens=64, messages=[{"role": "user", "content": [
        {"type": "document", "source": sources[0]}, {"type": "text", "text": "Weather?"}]}])
    assert reply.content[-1].type == "text"
    for source in ({"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
                   {"type": "url", "url": "https://x.test/a.pdf"}):
        with pytest.raises(anthropic.BadRequestError) as err:
            client.messages.create(model="think", max_tokens=8, messages=[{"role": "user", "content": [
                {"type": "document", "source": source}]}])
        assert "messages.0.content.0" in str(err.value) and "text source" in str(err.value)
