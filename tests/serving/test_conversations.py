"""OpenAI's Conversations API through the official SDK (client.conversations) and openai-agents'
OpenAIConversationsSession, against scripted checkpoints: the items kept on the server, and responses created
with `conversation` reading them as history and appending their own."""
from __future__ import annotations

import asyncio
from typing import Iterator

import openai
import pytest

from responses_fixtures import AGENT_ANSWER, THINK_ANSWER, build_agent
from scripted import _answer, build_scripted_checkpoint
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("conversations")
    models = [tiny_served_model(build_scripted_checkpoint(root / "think", THINK_ANSWER).path, "think"),
              tiny_served_model(build_agent(root / "agent").path, "agent")]
    app = create_app(models, ServerConfig(ui_db_path=str(root / "chats.db"), enable_ui=False))
    with BackgroundServer(app) as srv:
        yield srv


def test_a_conversations_items_and_metadata(client: openai.OpenAI) -> None:
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "Hello"},
                                              {"type": "message", "role": "assistant", "content": "Hi there"}],
                                       metadata={"topic": "greetings"})
    assert conv.object == "conversation" and conv.id.startswith("conv_") and conv.metadata == {"topic": "greetings"}
    assert client.conversations.retrieve(conv.id).created_at == conv.created_at
    added = client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Bye"}])
    assert [i.content[0].text for i in added.data] == ["Bye"]
    listed = client.conversations.items.list(conv.id, order="asc")
    assert [(i.role, i.content[0].type, i.content[0].text) for i in listed.data] == [
        ("user", "input_text", "Hello"), ("assistant", "output_text", "Hi there"), ("user", "input_text", "Bye")]
    newest = client.conversations.items.list(conv.id, limit=2)  # newest first by default, paged
    assert [i.content[0].text for i in newest.data] == ["Bye", "Hi there"] and newest.has_more
    rest = client.conversations.items.list(conv.id, limit=2, after=newest.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["Hello"] and not rest.has_more
    first = listed.data[0]
    assert client.conversations.items.retrieve(first.id, conversation_id=conv.id).content[0].text == "Hello"
    assert client.conversations.items.delete(first.id, conversation_id=conv.id).id == conv.id
    assert len(client.conversations.items.list(conv.id).data) == 2
    assert client.conversations.update(conv.id, metadata={"topic": "farewells"}).metadata == {"topic": "farewells"}
    assert client.conversations.delete(conv.id).deleted
    for call in (lambda: client.conversations.retrieve(conv.id), lambda: client.conversations.items.list(conv.id),
                 lambda: client.conversations.items.retrieve("msg_x", conversation_id=conv.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_responses_read_and_extend_their_conversation(client: openai.OpenAI) -> None:
    """A tool loop over two responses joined only by the conversation: the second reads the first's call (its
    prompt starts with the first's, from the prefix cache) and both turns' items end in the conversation."""
    conv = client.conversations.create()
    question = "Weather and time in Paris? " * 8
    first = client.responses.create(model="agent", conversation=conv.id, input=question, tools=[WEATHER, TIME])
    assert first.conversation.id == conv.id
    calls = [c for c in first.output if c.type == "function_call"]
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls]
    second = client.responses.create(model="agent", conversation={"id": conv.id}, input=outputs,
                                     tools=[WEATHER, TIME], stream=True)
    final = [e for e in second if e.type == "response.completed"][0].response
    assert final.output_text == AGENT_ANSWER
    assert final.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 4
    kinds = [i.type for i in client.conversations.items.list(conv.id, order="asc", limit=100).data]
    assert kinds == (["message"] + [o.type for o in first.output] + ["function_call_output"] * len(outputs)
                     + [o.type for o in final.output])
    with pytest.raises(openai.BadRequestError, match="cannot both be set"):
        client.responses.create(model="agent", conversation=conv.id, previous_response_id=first.id, input="x")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="think", conversation="conv_unknown", input="Hello there")


def test_openai_agents_conversation_session(server: BackgroundServer) -> None:
    """openai-agents' OpenAIConversationsSession keeps the history on the server: a second run sees the first."""
    from agents import Agent, OpenAIConversationsSession, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)

    async def two_runs() -> tuple[str, list]:
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        session = OpenAIConversationsSession(openai_client=async_client)
        agent = Agent(name="greeter", model=OpenAIResponsesModel("think", async_client))
        first = await Runner.run(agent, "Hello there", session=session)
        await Runner.run(agent, "Hello again", session=session)
        return first.final_output, await session.get_items()

    answer, items = asyncio.run(two_runs())
    assert answer == _answer(THINK_ANSWER)
    texts = [i["content"][0]["text"] for i in items if i.get("type") == "message" and i.get("role") == "user"]
    assert texts == ["Hello there", "Hello again"]
