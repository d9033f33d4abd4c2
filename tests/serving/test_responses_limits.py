"""/v1/responses at the edges clients reach (found with the SDK and openai-agents): the context's end, long
histories with truncation "auto", the input token count, a stream the client leaves, retrieval while one runs,
and the requests OpenAI refuses. A scripted model with a small context so the edges are near."""
from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import openai
import pytest

from responses_fixtures import THINK_ANSWER
from scripted import build_scripted_checkpoint
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

CONTEXT = 160
WORDS = "The quick brown fox jumps over the lazy dog by the river bank. "


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("responses-limits")
    think = build_scripted_checkpoint(root / "think", THINK_ANSWER)
    models = [tiny_served_model(think.path, "think", max_model_len=CONTEXT),
              tiny_served_model(think.path, "roomy")]
    app = create_app(models, ServerConfig(ui_db_path=str(root / "chats.db"), enable_ui=False))
    with BackgroundServer(app) as srv:
        yield srv


def long_input(client: openai.OpenAI, tokens: int) -> str:
    """A text whose prompt is about `tokens` long (counted by the server's own input token count)."""
    def count(text: str) -> int:
        try:
            return client.responses.input_tokens.count(model="think", input=text).input_tokens
        except openai.BadRequestError:  # past the context
            return CONTEXT + 1

    text = WORDS
    while count(text + WORDS) < tokens - 2:
        text += WORDS
    while count(text) < tokens - 2:
        text += "fox "
    return text


def test_max_output_tokens_past_the_context_end_there(client: openai.OpenAI) -> None:
    """max_output_tokens is a budget: with less room in the context the response ends incomplete at the context's
    end, streamed or not (it had been a 400 unstreamed and a failed stream)."""
    text = long_input(client, CONTEXT - 6)  # less room than the scripted answer needs
    whole = client.responses.create(model="think", input=text, max_output_tokens=100,
                                    reasoning={"effort": "none"})
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert 0 < whole.usage.output_tokens <= 8
    events = list(client.responses.create(model="think", input=text, max_output_tokens=100,
                                          reasoning={"effort": "none"}, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens <= 8


def test_truncation_auto_drops_the_oldest_turns(client: openai.OpenAI) -> None:
    text = long_input(client, CONTEXT // 3)
    first = client.responses.create(model="think", input=text, reasoning={"effort": "none"})
    second = client.responses.create(model="think", input=text, previous_response_id=first.id,
                                     reasoning={"effort": "none"}, truncation="auto")
    assert second.truncation == "auto"
    with pytest.raises(openai.BadRequestError) as info:  # the third turn no longer fits as a whole
        client.responses.create(model="think", input=text, previous_response_id=second.id,
                                reasoning={"effort": "none"})
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "input"
    third = client.responses.create(model="think", input=text, previous_response_id=second.id,
                                    reasoning={"effort": "none"}, truncation="auto")
    assert third.status in ("completed", "incomplete") and third.truncation == "auto"
    assert third.usage.input_tokens < CONTEXT


def test_input_token_count_is_what_the_response_reads(client: openai.OpenAI) -> None:
    counted = client.responses.input_tokens.count(model="roomy", input="Hello there", instructions="Be brief.")
    made = client.responses.create(model="roomy", input="Hello there", instructions="Be brief.")
    assert counted.object == "response.input_tokens" and counted.input_tokens == made.usage.input_tokens


def test_a_stream_is_retrievable_while_it_runs_and_after_the_client_left(server: BackgroundServer) -> None:
    body = {"model": "roomy", "input": "Hello there", "stream": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60) as r:
        lines = r.iter_lines()
        created = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))
        response_id = created["response"]["id"]
        assert created["response"]["usage"] is None  # OpenAI's: no usage until it ends
        live = httpx.get(f"{server.url}/v1/responses/{response_id}", timeout=10).json()
        assert live["status"] in ("in_progress", "completed")
    for _ in range(100):  # the server notices the closed stream at its next write
        stored = httpx.get(f"{server.url}/v1/responses/{response_id}", timeout=10)
        if stored.status_code == 200 and stored.json()["status"] in ("cancelled", "completed"):
            break
        time.sleep(0.05)
    assert stored.status_code == 200 and stored.json()["status"] in ("cancelled", "completed")


def test_what_openai_refuses(client: openai.OpenAI) -> None:
    done = client.responses.create(model="roomy", input="Hello there")
    assert done.completed_at is not None and done.completed_at >= done.created_at
    with pytest.raises(openai.BadRequestError, match="no tool call found"):
        client.responses.create(model="roomy", input=[
            {"type": "function_call_output", "call_id": "call_nowhere", "output": "42"}])
    with pytest.raises(openai.BadRequestError) as info:  # no events are kept to replay: said, not an empty stream
        list(client.responses.retrieve(done.id, stream=True))
    assert info.value.body["param"] == "stream"


@pytest.mark.parametrize("items, message", [
    ([{"type": "web_search_call", "id": "ws_1"}], "input[0]: type 'web_search_call' is not supported here"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}],
     "input[0].content[0]: type 'input_file' is not supported here"),
    ([{"type": "function_call", "call_id": "c1", "arguments": "{}"}], "input[0].name: Field required"),
])
def test_an_unusable_input_item_is_named(client: openai.OpenAI, items: list, message: str) -> None:
    """The 400 names the item and what is wrong with it, not that the input is no string."""
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="roomy", input=items)
    assert info.value.body["param"] == "input" and info.value.body["message"].startswith(message)
