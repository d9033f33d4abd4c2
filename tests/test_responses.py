"""/v1/responses through the official openai SDK, against scripted checkpoints served by the real engine."""
from __future__ import annotations

import json
from pathlib import Path
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
    root = tmp_path_factory.mktemp("responses")
    think = build_scripted_checkpoint(root / "think", THINK_ANSWER)
    agent = build_agent(root / "agent")
    models = [tiny_served_model(think.path, "think"), tiny_served_model(agent.path, "agent")]
    app = create_app(models, ServerConfig(ui_db_path=str(root / "chats.db"), enable_ui=False))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_plain_response_has_reasoning_and_message_items(client: openai.OpenAI) -> None:
    r = client.responses.create(model="think", input="Hello there")
    assert r.status == "completed" and r.object == "response"
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user says hello. A short, friendly greeting fits."
    assert r.output_text == _answer(THINK_ANSWER)
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
