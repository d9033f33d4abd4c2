"""/v1/responses through the official openai SDK, against scripted checkpoints served by the real engine."""
from __future__ import annotations

import json
from typing import Iterator

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from responses_fixtures import AGENT_ANSWER, THINK_ANSWER, build_agent
from scripted import _answer, build_scripted_checkpoint
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
NOTE_ARGS = {"title": "Trip", "text": "Pack the blue tent, two maps, a stove, dry socks and enough coffee for four "
             "cold mornings by the lake."}
WRITER_SCRIPT = ("<think>\nThe user wants a note saved.\n</think>\n\n"
                 '<tool_call>\n{"name": "save_note", "arguments": ' + json.dumps(NOTE_ARGS) + "}\n</tool_call>")
NOTE = {"type": "function", "name": "save_note", "description": "Save a note",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"}, "text": {"type": "string"}}}}
# A call, then text after it: the message item must open only once the call's item is done.
CALL_THEN_TEXT = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                  "I will tell you once it answers.")
TIME = {"type": "function", "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("responses")
    think = build_scripted_checkpoint(root / "think", THINK_ANSWER)
    agent = build_agent(root / "agent")
    writer = build_scripted_checkpoint(root / "writer", WRITER_SCRIPT)
    chatty = build_scripted_checkpoint(root / "chatty", CALL_THEN_TEXT)
    models = [tiny_served_model(think.path, "think"), tiny_served_model(agent.path, "agent"),
              tiny_served_model(writer.path, "writer"), tiny_served_model(chatty.path, "chatty")]
    app = create_app(models, ServerConfig(ui_db_path=str(root / "chats.db"), enable_ui=False))
    with BackgroundServer(app) as srv:
        srv.models = {m.name: m for m in models}
        yield srv


def test_plain_response_has_reasoning_and_message_items(client: openai.OpenAI) -> None:
    r = client.responses.create(model="think", input="Hello there")
    assert r.status == "completed" and r.object == "response"
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user says hello. A short, friendly greeting fits."
    assert r.output_text == _answer(THINK_ANSWER)
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_stream_events_in_order_with_sequence_numbers(client: openai.OpenAI) -> None:
    with client.responses.stream(model="think", input="Hello there") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"

    def block(item_type: str, delta: str, done: str) -> None:
        """The events of one text item: added, part added, deltas, text done, part done, item done."""
        start = next(i for i, e in enumerate(events)
                     if e.type == "response.output_item.added" and e.item.type == item_type)
        end = kinds.index("response.output_item.done", start)
        inner = kinds[start + 1:end]
        assert inner[0] == "response.content_part.added" and inner[-2:] == [done, "response.content_part.done"]
        assert set(inner[1:-2]) == {delta}
        assert all(getattr(e, "item_id", None) == events[start].item.id for e in events[start + 1:end])

    block("reasoning", "response.reasoning_text.delta", "response.reasoning_text.done")
    block("message", "response.output_text.delta", "response.output_text.done")
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == _answer(THINK_ANSWER)
    assert final.status == "completed" and [i.type for i in final.output] == ["reasoning", "message"]


def test_function_tools_over_two_turns(client: openai.OpenAI) -> None:
    first = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[WEATHER, TIME])
    calls = [i for i in first.output if i.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].call_id != calls[1].call_id
    assert first.output[0].type == "reasoning"
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": f"result of {c.name}"} for c in calls]
    # The client resends the whole conversation (no previous_response_id): its own items plus the outputs.
    history = [{"role": "user", "content": "Weather and time in Paris?"}] + [i.model_dump() for i in first.output]
    second = client.responses.create(model="agent", input=history + outputs, tools=[WEATHER, TIME])
    assert second.output_text == AGENT_ANSWER and [i.type for i in second.output] == ["message"]


def test_previous_response_id_continues_and_reuses_the_prefix_cache(client: openai.OpenAI) -> None:
    first = client.responses.create(model="agent", input="Weather and time in Paris? " * 8, tools=[WEATHER, TIME])
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}
               for c in first.output if c.type == "function_call"]
    second = client.responses.create(model="agent", previous_response_id=first.id, input=outputs,
                                     tools=[WEATHER, TIME])
    assert second.previous_response_id == first.id and second.output_text == AGENT_ANSWER
    # The first turn's prompt is a prefix of the second's: its blocks come from the prefix cache.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 4
    items = client.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data] == ["function_call_output", "function_call_output"]


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}, "required": ["mood"],
              "additionalProperties": False}
    r = client.responses.create(model="think", input="How are you?", max_output_tokens=200,
                                reasoning={"effort": "none"},
                                text={"format": {"type": "json_schema", "name": "mood", "schema": schema, "strict": True}})
    assert json.loads(r.output_text)["mood"] in ("happy", "sad")
    assert [i.type for i in r.output] == ["message"] and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.text.format.type == "json_schema"


def test_retrieve_and_delete(client: openai.OpenAI) -> None:
    r = client.responses.create(model="think", input="Hello there", instructions="Be brief.")
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.instructions == "Be brief."
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    unstored = client.responses.create(model="think", input="Hello there", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_errors_are_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="think", input="Hi", previous_response_id="resp_nope")
    assert "resp_nope" in err.value.message
    for bad in ([{"type": "bogus"}], [{"type": "function_call_output", "output": "no call id"}],
                [{"role": "user"}], [{"role": "wizard", "content": "hi"}]):
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="think", input=bad)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="think", input="Hi", tool_choice="required")
    image = [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                          {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]
    with pytest.raises(openai.BadRequestError, match="does not accept image_url input"):  # a text-only model
        client.responses.create(model="think", input=image)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="think", input=[{"type": "mcp_approval_response", "approval_request_id": "x",
                                                      "approve": True}])


def test_background_response(client: openai.OpenAI) -> None:
    import time

    r = client.responses.create(model="think", input="Hello there", background=True)
    assert r.status in ("queued", "in_progress") and r.background
    deadline = time.monotonic() + 60
    while (got := client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got.status == "completed" and got.output_text == _answer(THINK_ANSWER)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(client.responses.create(model="think", input="Hi").id)  # not background


def test_streamed_function_calls_and_openapi(client: openai.OpenAI, server: BackgroundServer) -> None:
    import httpx

    with client.responses.stream(model="agent", input="Weather and time in Paris?", tools=[WEATHER, TIME],
                                 parallel_tool_calls=False) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    start = kinds.index("response.function_call_arguments.delta")
    end = kinds.index("response.output_item.done", start)
    assert kinds[start - 1] == "response.output_item.added" and events[start - 1].item.type == "function_call"
    assert set(kinds[start:end - 1]) == {"response.function_call_arguments.delta"}
    assert kinds[end - 1:end + 1] == ["response.function_call_arguments.done", "response.output_item.done"]
    assert kinds.count("response.output_item.added") == 2  # reasoning, then one call (parallel_tool_calls=false)
    call = final.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == "".join(e.delta for e in events[start:end - 1]) == events[end - 1].arguments
    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ResponsesRequest")
    assert {"/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
            "/v1/responses/{response_id}/input_items"} <= set(spec["paths"])


def assert_items_one_after_another(events: list) -> None:
    """OpenAI closes an output item (function_call_arguments.done, output_item.done) before it adds the next."""
    open_items: set[int] = set()
    for e in events:
        if e.type == "response.output_item.added":
            assert not open_items, f"item {e.output_index} added while {open_items} still open"
            open_items.add(e.output_index)
        elif e.type == "response.output_item.done":
            open_items.remove(e.output_index)
        elif hasattr(e, "output_index"):
            assert open_items == {e.output_index}, e.type
    assert not open_items


def test_parallel_streamed_calls_are_items_one_after_another(client: openai.OpenAI) -> None:
    # Clients that keep "the current item" used to see the second call added while the first was still open.
    with client.responses.stream(model="agent", input="Weather and time in Paris?", tools=[WEATHER, TIME]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [i.type for i in final.output] == ["reasoning", "function_call", "function_call"]
    assert_items_one_after_another(events)
    assert [c.arguments for c in final.output[1:]] == ['{"city": "Paris"}', '{"city": "Paris, France"}']


def test_text_after_a_call_opens_its_message_once_the_call_is_done(client: openai.OpenAI,
                                                                   server: BackgroundServer) -> None:
    """The message used to be added while the call's item was open (its done events came after the message's).
    Every event and the final body also pass the SDK's own types strictly (usage.input_tokens_details's
    cache_write_tokens, required since openai 3.x, was missing)."""
    with client.responses.stream(model="chatty", input="Weather in Paris?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [i.type for i in final.output] == ["function_call", "message"]
    assert final.output[1].content[0].text == "I will tell you once it answers."
    assert_items_one_after_another(events)
    with httpx.stream("POST", server.url + "/v1/responses", timeout=60, json={
            "model": "chatty", "input": "Weather in Paris?", "tools": [WEATHER], "stream": True}) as raw:
        frames = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
    for frame in frames:
        TypeAdapter(ResponseStreamEvent).validate_python(frame, strict=True)
    Response.model_validate(frames[-1]["response"])
    assert frames[-1]["response"]["usage"]["input_tokens_details"]["cache_write_tokens"] == 0


def test_errors_name_the_responses_fields(client: openai.OpenAI) -> None:
    """Errors raised by the chat layer the request is translated into name the Responses API's own fields."""
    bad_format = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "minProperties": "x"}}}
    bad_tool = {**WEATHER, "parameters": [1]}
    for kwargs, param in ((dict(text=bad_format), "text.format"), (dict(tools=[bad_tool]), "tools.0.parameters"),
                          (dict(tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}), "tool_choice")):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="think", input="Hi", **kwargs)
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == param, body
        assert "response_format" not in body["message"] and ".function." not in body["message"], body


def test_reasoning_effort_maps_onto_thinking(client: openai.OpenAI) -> None:
    off = client.responses.create(model="think", input="Hello there", reasoning={"effort": "minimal"})
    assert [i.type for i in off.output] == ["message"] and off.output_text == _answer(THINK_ANSWER)
    on = client.responses.create(model="think", input="Hello there", reasoning={"effort": "high", "summary": "auto"})
    assert [i.type for i in on.output] == ["reasoning", "message"] and on.reasoning.effort == "high"
    cut = client.responses.create(model="think", input="Hello there", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3
    # The item the limit cut is incomplete too (OpenAI's shape), streamed or not; whole items stay completed.
    for reasoning in ({"effort": "minimal"}, None):
        kwargs = {"reasoning": reasoning} if reasoning else {}
        cut = client.responses.create(model="think", input="Hello there", max_output_tokens=4, **kwargs)
        assert [i.status for i in cut.output] == ["incomplete"], cut.output
        events = list(client.responses.create(model="think", input="Hello there", max_output_tokens=4, stream=True,
                                              **kwargs))
        done = [e.item.status for e in events if e.type == "response.output_item.done"]
        assert done == ["incomplete"] and events[-1].response.output[0].status == "incomplete"
    assert all(i.status == "completed" for i in on.output)


def recorded_params(server: BackgroundServer, model: str, monkeypatch: pytest.MonkeyPatch) -> list:
    """The sampling parameters of every turn the model runs from now on."""
    engine = server.models[model].engine
    generate = engine.generate
    seen: list = []

    def recording(prompt_ids, params, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(params)
        return generate(prompt_ids, params, **kwargs)

    monkeypatch.setattr(engine, "generate", recording)
    return seen


def test_temperature_top_p_and_seed_reach_sampling(client: openai.OpenAI, server: BackgroundServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen = recorded_params(server, "think", monkeypatch)
    r = client.responses.create(model="think", input="Hello there", temperature=0.7, top_p=0.5, extra_body={"seed": 3})
    assert (seen[0].temperature, seen[0].top_p, seen[0].seed) == (0.7, 0.5, 3)
    assert (r.temperature, r.top_p) == (0.7, 0.5)
    client.responses.create(model="think", input="Hello there", temperature=0)
    assert seen[1].temperature == 0  # greedy when asked


def test_low_and_medium_effort_budget_the_thinking(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenstack.serving import protocol
    from qwenstack.serving.responses import translate
    from qwenstack.serving.responses.protocol import ResponsesRequest

    def budget(effort: str) -> int | None:
        body = ResponsesRequest.model_validate({"model": "think", "input": "Hi", "reasoning": {"effort": effort}})
        return translate.chat_request(body, [{"role": "user", "content": "Hi"}], [], None).thinking_budget_tokens

    assert (budget("low"), budget("medium"), budget("high")) == (1024, 8192, None)
    full = client.responses.create(model="think", input="Hello there", reasoning={"effort": "medium"})
    # The scripted thinking is far shorter than 1024 tokens: a small stand-in budget shows that "low" is enforced.
    monkeypatch.setitem(protocol.EFFORT_BUDGETS, "low", 4)
    low = client.responses.create(model="think", input="Hello there", reasoning={"effort": "low"})
    thought, cut = full.output[0].content[0].text, low.output[0].content[0].text
    assert cut and thought.startswith(cut) and len(cut) < len(thought)
    assert low.usage.output_tokens_details.reasoning_tokens < full.usage.output_tokens_details.reasoning_tokens
    assert low.output_text == full.output_text == _answer(THINK_ANSWER)  # the answer follows the forced close


def test_json_object_text_format(client: openai.OpenAI) -> None:
    r = client.responses.create(model="think", input="How are you?", max_output_tokens=8, reasoning={"effort": "none"},
                                text={"format": {"type": "json_object"}})
    # Without the grammar this model says "Hello! ..." (with it, only the object's start is predictable).
    assert r.output_text.startswith("{") and r.text.format.type == "json_object", r.output_text


def test_input_items_are_paged(client: openai.OpenAI) -> None:
    notes = [f"note {i}" for i in range(5)]
    r = client.responses.create(model="think", input=[{"role": "user", "content": n} for n in notes])

    def texts(page) -> list[str]:  # noqa: ANN001
        return [i.content[0].text for i in page.data]

    first = client.responses.input_items.list(r.id, limit=2, order="asc")
    assert texts(first) == notes[:2] and first.has_more and first.first_id == first.data[0].id
    second = client.responses.input_items.list(r.id, limit=2, order="asc", after=first.last_id)
    assert texts(second) == notes[2:4] and second.has_more
    last = client.responses.input_items.list(r.id, limit=2, order="asc", after=second.last_id)
    assert texts(last) == notes[4:] and not last.has_more
    assert texts(client.responses.input_items.list(r.id, limit=2)) == ["note 4", "note 3"]  # newest first by default
    assert [i.content[0].text for i in client.responses.input_items.list(r.id, limit=2, order="asc")] == notes


def test_function_call_arguments_stream_as_the_model_writes_them(client: openai.OpenAI) -> None:
    with client.responses.stream(model="writer", input="Save a note for the trip.", tools=[NOTE]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    call = final.output[-1]
    assert call.type == "function_call" and json.loads(call.arguments) == NOTE_ARGS
    assert len(deltas) > 5 and "".join(deltas) == call.arguments == json.dumps(NOTE_ARGS, ensure_ascii=False)
    first = kinds.index("response.function_call_arguments.delta")
    assert kinds[first - 1] == "response.output_item.added" and events[first - 1].item.arguments == ""
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    whole = client.responses.create(model="writer", input="Save a note for the trip.", tools=[NOTE])
    assert whole.output[-1].arguments == call.arguments  # streamed or not, the same call
    # Cut off by max_output_tokens within the arguments: the item says so.
    cut = client.responses.create(model="writer", input="Save a note for the trip.", tools=[NOTE], max_output_tokens=30)
    assert cut.status == "incomplete" and cut.output[-1].type == "function_call"
    assert cut.output[-1].status == "incomplete" and call.arguments.startswith(cut.output[-1].arguments)


def test_named_tool_choice_forces_a_call_the_model_would_not_make(client: openai.OpenAI) -> None:
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[WEATHER, TIME],
                                tool_choice={"type": "function", "name": "get_time"}, parallel_tool_calls=False,
                                max_output_tokens=80)
    calls = [i for i in r.output if i.type == "function_call"]
    # Left alone this model calls get_weather first; the grammar makes it get_time, with arguments that follow its
    # schema (what the model writes off its script is arbitrary, so only their start is checked).
    assert [c.name for c in calls] == ["get_time"] and calls[0].arguments.startswith('{"city": "')
    assert r.tool_choice.name == "get_time"


def test_output_text_logprobs_when_included(client: openai.OpenAI) -> None:
    """include "message.output_text.logprobs": the answer's tokens (not the thinking's, nor the markup between)
    with their logprobs, joining to the text; streamed per delta, the same in the final item; absent otherwise."""
    answer = _answer(THINK_ANSWER).encode()
    r = client.responses.create(model="think", input="Hello there", include=["message.output_text.logprobs"],
                                top_logprobs=2)
    part = r.output[1].content[0]
    assert part.logprobs and b"".join(bytes(lp.bytes) for lp in part.logprobs) == answer
    assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in part.logprobs)
    assert r.top_logprobs == 2
    # The scripted model is sure of every token: its own token is the most likely.
    assert all(lp.top_logprobs[0].token == lp.token for lp in part.logprobs)

    with client.responses.stream(model="think", input="Hello there",
                                 include=["message.output_text.logprobs"]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [lp.token for lp in streamed] == [lp.token for lp in part.logprobs] == [lp.token for lp in done.logprobs]
    assert [lp.token for lp in final.output[1].content[0].logprobs] == [lp.token for lp in streamed]
    assert all(lp.top_logprobs == [] for lp in streamed)

    plain = client.responses.create(model="think", input="Hello there", top_logprobs=3)  # OpenAI's: not included
    assert plain.output[1].content[0].logprobs == []
