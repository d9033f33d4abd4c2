"""What the JavaScript clients send, replayed as their exact HTTP exchanges (the suite stays Python): the Vercel AI
SDK (`ai` with @ai-sdk/openai and @ai-sdk/openai-compatible), openai-node, ollama-js and @anthropic-ai/sdk were
run against a server on scripted checkpoints, and what broke is pinned here.

- @ai-sdk/openai's default model (the Responses API, store on) sends the reasoning item of a tool-calling step
  back as `{"type": "item_reference", "id": "rs_..."}` in the next step's input: a multi-step `generateText` /
  `streamText` with tools failed on its second step with a 400.
- @ai-sdk/openai reads a Responses reasoning item's `summary` only (never its `content`): asked for one
  (providerOptions.openai.reasoningSummary, with forceReasoning for a model id it does not know), it got an
  empty summary and showed no reasoning.
- @ai-sdk/openai's allowedTools option sends tool_choice {"type": "allowed_tools", "mode", "tools"}: only its
  mode was read, so the model was offered (and with "required" forced to call) tools outside the list.
- openai-node's chat tool_choice {"type": "allowed_tools", "allowed_tools": {"mode", "tools"}} was a 400.
- @ai-sdk/openai-compatible sends a PDF as a chat content part {"type": "file", "file": {...}}: its 400 said
  "messages.0.content: Input should be a valid string", about the string form the client did not send.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from responses_fixtures import AGENT_ANSWER, AGENT_SCRIPT, build_agent
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

# The AI SDK's tool definitions: zod-to-JSON-schema output, $schema and additionalProperties included.
AI_SDK_TOOLS = [
    {"type": "function", "name": name, "description": description,
     "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                    "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}
    for name, description in (("get_weather", "Current weather"), ("get_time", "Local time"))]
USER = {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("js-clients")
    models = [tiny_served_model(build_agent(root / "agent").path, "agent")]
    app = create_app(models, ServerConfig(ui_db_path=":memory:", enable_ui=False))
    with BackgroundServer(app) as srv:
        yield srv


def post(server: BackgroundServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def ai_sdk_second_step(first: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The AI SDK's second request: the user turn, the reasoning item by reference, the calls with their results
    (its own call items carry no id; the arguments re-serialised compactly)."""
    calls = [i for i in first["output"] if i["type"] == "function_call"]
    items = [USER, reference]
    items += [{"type": "function_call", "call_id": c["call_id"], "name": c["name"],
               "arguments": json.dumps(json.loads(c["arguments"]), separators=(",", ":"))} for c in calls]
    items += [{"type": "function_call_output", "call_id": c["call_id"], "output": '{"w":"sunny"}'} for c in calls]
    return {"model": "agent", "input": items, "tools": AI_SDK_TOOLS, "tool_choice": "auto"}


@pytest.mark.parametrize("stream", [False, True])
def test_ai_sdk_responses_tool_loop_sends_reasoning_by_reference(server: BackgroundServer, stream: bool) -> None:
    """generateText/streamText({model: openai('m'), tools, stopWhen: stepCountIs(3)}): step two references the
    stored reasoning item; the server reads it from the store (it used to answer 400 "type 'item_reference' is not
    supported here")."""
    first = post(server, "/v1/responses", {"model": "agent", "input": [USER], "tools": AI_SDK_TOOLS,
                                           "tool_choice": "auto"}).json()
    reasoning = first["output"][0]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    body = ai_sdk_second_step(first, {"type": "item_reference", "id": reasoning["id"]})
    if not stream:
        second = post(server, "/v1/responses", body)
        assert second.status_code == 200, second.text
        assert second.json()["output"][-1]["content"][0]["text"] == AGENT_ANSWER
        listed = httpx.get(f"{server.url}/v1/responses/{second.json()['id']}/input_items?order=asc").json()["data"]
        assert listed[1] == reasoning  # stored as the item it names
        return
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == AGENT_ANSWER


def test_an_item_reference_without_type_and_an_unknown_one(server: BackgroundServer) -> None:
    """OpenAI's reference type is optional ({"id": ...} alone); an id nothing stored holds is OpenAI's 404."""
    first = post(server, "/v1/responses", {"model": "agent", "input": [USER], "tools": AI_SDK_TOOLS}).json()
    second = post(server, "/v1/responses", ai_sdk_second_step(first, {"id": first["output"][0]["id"]}))
    assert second.status_code == 200 and second.json()["output"][-1]["content"][0]["text"] == AGENT_ANSWER
    missing = post(server, "/v1/responses", ai_sdk_second_step(first, {"type": "item_reference", "id": "rs_gone"}))
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["param"] == "input" and error["message"].startswith("Item with id 'rs_gone' not found")
    unstored = post(server, "/v1/responses", {"model": "agent", "input": [USER], "tools": AI_SDK_TOOLS,
                                              "store": False}).json()
    again = post(server, "/v1/responses", ai_sdk_second_step(unstored, {"type": "item_reference",
                                                                       "id": unstored["output"][0]["id"]}))
    assert again.status_code == 404  # store=false keeps nothing to reference, as at OpenAI


@pytest.mark.parametrize("part, message", [
    ({"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
     "messages.0.content.1: type 'file' is not supported here (supported: 'text', 'image_url', 'input_audio', "),
    ({"type": "text"}, "messages.0.content.1.text: Field required"),
])
def test_a_content_part_the_server_cannot_take_is_named(server: BackgroundServer, part: dict, message: str) -> None:
    """generateText({model: compat.chatModel(m), messages: [{role: "user", content: [{type: "text", ...},
    {type: "file", mediaType: "application/pdf", data}]}]}): the 400 names the part and its type."""
    content = [{"type": "text", "text": "Summarize this"}, part]
    r = post(server, "/v1/chat/completions", {"model": "agent", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith(message) and error["param"] == message.split(":")[0]
    whole = post(server, "/v1/chat/completions", {"model": "agent", "messages": [{"role": "user", "content": 5}]})
    assert whole.json()["error"]["message"].startswith("messages.0.content: Input should be a valid string")


def test_reasoning_summary_when_asked(server: BackgroundServer) -> None:
    """generateText/streamText({model: openai('m'), providerOptions: {openai: {forceReasoning: true,
    reasoningSummary: 'auto'}}}): the thinking comes as the reasoning item's summary too, with OpenAI's
    reasoning_summary_* events; without `reasoning.summary` the summary stays empty."""
    thought = AGENT_SCRIPT.split("<think>\n")[1].split("\n</think>")[0]
    body = {"model": "agent", "input": [USER], "tools": AI_SDK_TOOLS, "reasoning": {"summary": "auto"}}
    item = post(server, "/v1/responses", body).json()["output"][0]
    assert item["summary"] == [{"type": "summary_text", "text": thought}]
    assert item["content"] == [{"type": "reasoning_text", "text": thought}]  # vLLM's field, as before
    plain = post(server, "/v1/responses", {**body, "reasoning": {"effort": "high"}}).json()["output"][0]
    assert plain["summary"] == [] and plain["content"][0]["text"] == thought
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    added = kinds.index("response.reasoning_summary_part.added")
    assert kinds.index("response.output_item.added") < added < kinds.index("response.reasoning_summary_text.delta")
    deltas = [e for e in events if e["type"] == "response.reasoning_summary_text.delta"]
    assert "".join(e["delta"] for e in deltas) == thought
    assert all((e["item_id"], e["summary_index"]) == (events[added]["item_id"], 0) for e in deltas)
    done = next(e for e in events if e["type"] == "response.reasoning_summary_part.done")
    assert done["part"] == {"type": "summary_text", "text": thought}
    assert kinds.index("response.reasoning_summary_part.done") < kinds.index("response.output_item.done")
    streamed = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert streamed["summary"] == item["summary"]
    first_added = next(e for e in events if e["type"] == "response.output_item.added")["item"]
    assert first_added["summary"] == []  # the snapshot at `added`, as OpenAI sends it


def test_allowed_tools_offers_only_the_listed_tools(server: BackgroundServer) -> None:
    """generateText({model: openai('m'), tools: {get_weather, get_time}, providerOptions: {openai: {allowedTools:
    {toolNames: ['get_time'], mode: 'required'}}}}): the agent model would call get_weather first; only get_time may
    be called (the forced call used to be get_weather)."""
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    r = post(server, "/v1/responses", {"model": "agent", "input": [USER], "tools": AI_SDK_TOOLS, "tool_choice": choice})
    assert r.status_code == 200, r.text
    calls = [i for i in r.json()["output"] if i["type"] == "function_call"]
    assert calls and {c["name"] for c in calls} == {"get_time"}
    assert r.json()["tool_choice"] == choice and len(r.json()["tools"]) == 2  # echoed as sent
    nothing = {**choice, "tools": [{"type": "function", "name": "get_nothing"}]}
    refused = post(server, "/v1/responses", {"model": "agent", "input": [USER], "tools": AI_SDK_TOOLS,
                                             "tool_choice": nothing})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"


def test_chat_allowed_tools(server: BackgroundServer) -> None:
    """openai.chat.completions.create({tools, tool_choice: {type: 'allowed_tools', allowed_tools: {mode:
    'required', tools: [{type: 'function', function: {name: 'get_time'}}]}}}) calls get_time only (it was a 400)."""
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in AI_SDK_TOOLS]
    choice = {"type": "allowed_tools",
              "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}
    body = {"model": "agent", "messages": [{"role": "user", "content": "Weather?"}], "tools": tools,
            "tool_choice": choice}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert calls and {c["function"]["name"] for c in calls} == {"get_time"}
    auto = {**choice, "allowed_tools": {**choice["allowed_tools"], "mode": "auto"}}
    free = post(server, "/v1/chat/completions", {**body, "tool_choice": auto}).json()["choices"][0]["message"]
    assert free["tool_calls"]  # the scripted model calls on its own; auto forces nothing
