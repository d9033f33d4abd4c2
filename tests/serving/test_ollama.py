"""Ollama's native API (/api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps, /api/version) through
the official `ollama` package, against scripted checkpoints served by the real engine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import ollama
import pytest

from responses_fixtures import AGENT_ANSWER, THINK_ANSWER, chat_api_models
from scripted import _answer
from server_utils import BackgroundServer, fail_after_first_output
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.ollama import translate
from qwenstack.serving.ollama.protocol import OllamaChatRequest
from qwenstack.serving.protocol import EFFORT_BUDGETS

KEY = "sk-ollama-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello there"}]
THOUGHT = "The user says hello. A short, friendly greeting fits."
ANSWER = _answer(THINK_ANSWER)  # "Hello! How can I help you today?"
GREEDY = {"temperature": 0}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "Weather and time in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    models = chat_api_models(tmp_path_factory.mktemp("ollama"), tiny_qwen3)
    app = create_app(models, ServerConfig(api_key=KEY, enable_ui=False))
    with BackgroundServer(app) as srv:
        srv.models = {m.name: m for m in models}
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> ollama.Client:
    return ollama.Client(host=server.url, headers=AUTH)


def chat(client: ollama.Client, **kwargs: Any) -> Any:
    kwargs.setdefault("model", "think")
    kwargs.setdefault("messages", HELLO)
    kwargs["options"] = {**GREEDY, **kwargs.get("options", {})}
    return client.chat(**kwargs)


def test_a_last_assistant_message_is_continued(server: BackgroundServer, client: ollama.Client) -> None:
    """As Ollama answers it: the model goes on from the assistant's text (chat's continue_final_message), and the
    message holds only what follows it."""
    prefill = [*HELLO, {"role": "assistant", "content": "Hello, Paris"}]
    r = chat(client, model="tiny", messages=prefill, options={"num_predict": 12})
    plain = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": prefill, "max_tokens": 12, "temperature": 0,
        "continue_final_message": True}).json()
    assert r.message.content == plain["choices"][0]["message"]["content"]
    assert r.prompt_eval_count == plain["usage"]["prompt_tokens"]


def reassembled(parts: list[Any]) -> dict[str, Any]:
    """The streamed chat lines joined as a client joins them."""
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].message.content == ""
    calls = [c.model_dump() for p in parts for c in (p.message.tool_calls or [])]
    return {"content": "".join(p.message.content or "" for p in parts),
            "thinking": "".join(p.message.thinking or "" for p in parts) or None, "tool_calls": calls or None}


def whole(response: Any) -> dict[str, Any]:
    m = response.message
    return {"content": m.content, "thinking": m.thinking,
            "tool_calls": [c.model_dump() for c in m.tool_calls] if m.tool_calls else None}


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """A message with its tool calls' ids blanked (each answer draws new ones)."""
    calls = message["tool_calls"]
    return {**message, "tool_calls": [{**c, "id": None} for c in calls] if calls else None}


COUNTERS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration")


def test_chat_answer_with_thinking_by_default(client: ollama.Client) -> None:
    r = chat(client)
    assert (r.model, r.done, r.done_reason, r.message.role) == ("think", True, "stop", "assistant")
    # As Ollama answers qwen3 without `think`: thinking on, in its own field.
    assert (r.message.thinking, r.message.content) == (THOUGHT, ANSWER)
    assert all(isinstance(getattr(r, k), int) for k in COUNTERS) and r.eval_count > 10 and r.prompt_eval_count > 5
    assert r.created_at.endswith("Z")


@pytest.mark.parametrize("model,extra", [
    ("think", {}),
    ("think", {"think": False}),
    ("think", {"options": {"stop": ["help"]}}),
    ("agent", {"messages": QUESTION, "tools": [WEATHER, TIME]}),
    ("think", {"options": {"num_predict": 5}}),  # cut inside the thinking
])
def test_stream_reassembles_to_the_whole_answer(client: ollama.Client, model: str, extra: dict[str, Any]) -> None:
    kwargs = {"model": model, **extra}
    parts = list(chat(client, stream=True, **kwargs))
    answer = chat(client, **kwargs)
    assert without_ids(reassembled(parts)) == without_ids(whole(answer))
    last = parts[-1]
    assert (last.done_reason, last.eval_count, last.prompt_eval_count) == (answer.done_reason, answer.eval_count,
                                                                           answer.prompt_eval_count)


def test_ndjson_is_the_default(server: BackgroundServer) -> None:
    with httpx.stream("POST", server.url + "/api/chat", headers=AUTH, timeout=30,
                      json={"model": "think:latest", "messages": HELLO, "options": GREEDY}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines()]
    assert len(lines) > 5 and lines[-1]["done"] is True and lines[-1]["model"] == "think:latest"
    assert set(lines[0]) == {"model", "created_at", "message", "done"} and lines[0]["done"] is False
    assert set(COUNTERS) <= set(lines[-1]) and lines[-1]["done_reason"] == "stop"


def test_think_switch_and_levels(client: ollama.Client) -> None:
    off = chat(client, think=False)
    assert (off.message.thinking, off.message.content) == (None, ANSWER) and off.eval_count < chat(client).eval_count
    for level in ("low", "medium", "high", "max"):
        on = chat(client, think=level)
        assert (on.message.thinking, on.message.content) == (THOUGHT, ANSWER), level

    def planned(think: Any) -> Any:
        body = {"model": "m", "messages": HELLO, "think": think}
        return translate.chat_request(OllamaChatRequest.model_validate(body))

    assert [planned(t).thinking_budget_tokens for t in ("low", "medium", "high", "max")] == [
        EFFORT_BUDGETS["low"], EFFORT_BUDGETS["medium"], None, None]
    assert planned("max").reasoning_effort == "xhigh" and planned(None).chat_template_kwargs is None
    assert planned(False).chat_template_kwargs == {"enable_thinking": False}


def test_tool_calls_have_object_arguments_and_results_come_back(client: ollama.Client) -> None:
    first = chat(client, model="agent", messages=QUESTION, tools=[WEATHER, TIME])
    calls = first.message.tool_calls
    assert first.done_reason == "stop" and first.message.content == ""
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                        ("get_time", {"city": "Paris, France"})]
    assert first.message.thinking == "Weather and time in Paris: two calls."
    history = QUESTION + [first.message.model_dump(exclude_none=True),
                          {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
                          {"role": "tool", "content": "the clock is broken", "tool_name": "get_time"}]
    second = chat(client, model="agent", messages=history, tools=[WEATHER, TIME])
    assert (second.message.content, second.message.tool_calls) == (AGENT_ANSWER, None)
    request = translate.chat_request(OllamaChatRequest.model_validate({"model": "agent", "messages": history}))
    turn = request.messages[1]
    assert turn.reasoning_content == first.message.thinking
    assert [c.function.arguments for c in turn.tool_calls] == [{"city": "Paris"}, {"city": "Paris, France"}]
    assert [(m.role, m.name) for m in request.messages[2:]] == [("tool", "get_weather"), ("tool", "get_time")]


def test_format_schema_and_json(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}, "required": ["mood"],
              "additionalProperties": False}
    r = chat(client, format=schema)
    jsonschema.validate(json.loads(r.message.content), schema)  # unconstrained, this model says "Hello!..."
    assert r.message.thinking == THOUGHT  # the grammar holds the answer, after the thinking
    # "json": any object (this model, held to one, writes a long key: the first tokens show the grammar).
    assert chat(client, format="json", think=False, options={"num_predict": 3}).message.content.startswith('{"')


def test_options_reach_sampling(client: ollama.Client, server: BackgroundServer,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.models["think"].engine
    generate, seen = engine.generate, []
    monkeypatch.setattr(engine, "generate", lambda ids, params, **kw: (seen.append(params),
                                                                       generate(ids, params, **kw))[1])
    cut = chat(client, think=False, options={"num_predict": 3, "stop": ["never"], "seed": 7, "temperature": 0.5,
                                             "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1,
                                             "presence_penalty": 0.5, "frequency_penalty": 0.25, "num_ctx": 8192,
                                             "mirostat": 1})
    p = seen[-1]
    assert (p.max_tokens, p.stop, p.seed, p.temperature, p.top_p, p.top_k, p.min_p) == (3, ["never"], 7, 0.5, 0.9,
                                                                                         5, 0.1)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.1, 0.5, 0.25)
    assert (cut.done_reason, cut.eval_count) == ("length", 3) and ANSWER.startswith(cut.message.content)
    chat(client, options={"num_predict": -1, "seed": -1})  # Ollama's "no limit" and "random seed"
    assert (seen[-1].max_tokens, seen[-1].seed) == (None, None)
    # More than the context holds (clients send num_predict whatever the prompt): the turn stops at its end.
    full = chat(client, model="short", think=False, options={"num_predict": 4096})
    assert full.done_reason == "length" and full.prompt_eval_count + full.eval_count == 30
    assert ANSWER.startswith(full.message.content)
    stopped = chat(client, think=False, options={"stop": ["help"]})
    assert stopped.message.content == ANSWER[:ANSWER.index("help")] and stopped.done_reason == "stop"


def test_generate_templated_and_raw(client: ollama.Client, server: BackgroundServer) -> None:
    r = client.generate(model="think", prompt="Hello there", options=GREEDY)
    assert (r.response, r.thinking, r.done_reason, r.context) == (ANSWER, THOUGHT, "stop", None)
    assert client.generate(model="think", prompt="Hello there", think=False, options=GREEDY).thinking is None
    with_system = client.generate(model="think", prompt="Hello there", system="Be brief.", options=GREEDY)
    assert with_system.response == ANSWER and with_system.prompt_eval_count > r.prompt_eval_count
    parts = list(client.generate(model="think", prompt="Hello there", stream=True, options=GREEDY))
    assert "".join(p.response for p in parts) == ANSWER and "".join(p.thinking or "" for p in parts) == THOUGHT
    assert parts[-1].done and parts[-1].eval_count == r.eval_count
    # raw: the prompt as given (here templated by hand), the text as generated: nothing is parsed.
    tok = server.models["think"].tokenizer
    prompt = tok.apply_chat_template(HELLO, add_generation_prompt=True)
    raw = client.generate(model="think", prompt=prompt, raw=True, options=GREEDY)
    assert (raw.response, raw.thinking) == (THINK_ANSWER, None)
    assert raw.prompt_eval_count == r.prompt_eval_count == len(tok.encode(prompt))


def test_load_only_requests(client: ollama.Client) -> None:
    loaded = client.chat(model="think", messages=[])
    assert (loaded.done, loaded.done_reason, loaded.message.content) == (True, "load", "")
    assert client.generate(model="think:latest").done_reason == "load"
    # `ollama stop` sends keep_alive 0: Ollama says "unload" (models stay loaded here, the answer is Ollama's)
    for keep_alive in (0, "0", "0s", 0.0):
        assert client.generate(model="think", keep_alive=keep_alive).done_reason == "unload", keep_alive
    assert client.chat(model="think", messages=[], keep_alive="0m").done_reason == "unload"
    assert client.generate(model="think", keep_alive="5m").done_reason == "load"


def test_head_is_answered_like_get(server: BackgroundServer) -> None:
    """Ollama's CLI checks the server with `HEAD /` before every command (a 405 was fatal to it); HEAD on any GET
    route answers the GET's status and headers without the body. With the chat page off, / still answers."""
    for path, headers in (("/", {}), ("/api/version", AUTH), ("/api/tags", AUTH), ("/health", {})):
        got, head = httpx.get(server.url + path, headers=headers), httpx.head(server.url + path, headers=headers)
        assert got.status_code == head.status_code == 200 and got.content and head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"]
    assert httpx.get(server.url + "/").text == "qwenstack is running"
    assert httpx.head(server.url + "/api/tags").status_code == 401  # the key is still asked for
    assert httpx.head(server.url + "/nowhere", headers=AUTH).status_code == 404


def test_embed_equals_v1_embeddings(client: ollama.Client, server: BackgroundServer) -> None:
    texts = ["a short text", "another, longer text about the weather"]
    got = client.embed(model="think:latest", input=texts)
    want = httpx.post(server.url + "/v1/embeddings", headers=AUTH, timeout=30,
                      json={"model": "think", "input": texts}).json()
    assert got.embeddings == [d["embedding"] for d in want["data"]]
    assert got.prompt_eval_count == want["usage"]["prompt_tokens"] and got.model == "think:latest"
    assert client.embed(model="think", input=texts[0]).embeddings == got.embeddings[:1]
    assert client.embeddings(model="think", prompt=texts[0]).embedding == got.embeddings[0]
    assert client.embed(model="think", input="").embeddings == []
    assert len(client.embed(model="think", input=texts, dimensions=4).embeddings[0]) == 4
    # Ollama cuts a long input to the context unless told not to.
    long = "hello " * 100
    assert client.embed(model="short", input=long).prompt_eval_count == 30
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="short", input=long, truncate=False)
    assert err.value.status_code == 400 and "context length" in err.value.error


def test_model_listing_show_ps_and_version(client: ollama.Client, server: BackgroundServer) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"think:latest", "agent:latest", "short:latest", "tiny:latest"}
    think = listed["think:latest"]
    assert think.size > 0 and len(think.digest) == 64 and think.details.family == "qwen3"
    assert think.details.quantization_level == "F32" and think.details.parameter_size.endswith("K")
    shown = client.show("think:latest")
    assert {"completion", "tools", "thinking"} <= set(shown.capabilities)
    assert shown.modelinfo["qwen3.context_length"] == 4096 and "num_ctx" in shown.parameters
    assert shown.details == think.details and shown.template
    running = {m.model: m for m in client.ps().models}
    ps = running["think:latest"]
    assert (ps.name, ps.size_vram, ps.context_length, ps.digest) == ("think", 0, 4096, think.digest)
    assert ps.size > think.size and ps.expires_at.year > 2100  # weights plus KV cache; never unloaded
    raw = httpx.get(server.url + "/api/ps", headers=AUTH).json()["models"][0]
    assert {"weights_bytes", "kv_cache_bytes", "device", "dtype", "kv_usage", "running", "waiting"} <= set(raw)
    version = httpx.get(server.url + "/api/version", headers=AUTH).json()
    assert version["version"].count(".") == 2 and version["qwenstack"]


def test_errors_are_ollama_shaped(client: ollama.Client, server: BackgroundServer) -> None:
    for call in (lambda: chat(client, model="llama3.2"), lambda: client.generate(model="nope:7b", prompt="hi"),
                 lambda: client.embed(model="nope", input="hi"), lambda: client.show("nope")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and "not found" in err.value.error  # clients offer a pull on 404
    bad = [({"messages": [{"role": "wizard", "content": "hi"}]}, "role"), ({"think": "extreme"}, "think"),
           ({"options": {"temperature": "hot"}}, "temperature"), ({"format": 7}, "format")]
    for body, word in bad:
        r = httpx.post(server.url + "/api/chat", headers=AUTH, json={"model": "think", "messages": HELLO, **body})
        assert r.status_code == 400 and set(r.json()) == {"error"} and word in r.json()["error"], body
    for extra in ({"suffix": "}"}, {"raw": True, "system": "S"}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="think", prompt="def f(", **extra)
        assert err.value.status_code == 400, extra
    with pytest.raises(ollama.ResponseError) as err:  # a text-only model
        chat(client, messages=[{"role": "user", "content": "What is this?", "images": ["aGVsbG8="]}])
    assert err.value.status_code == 400 and "image" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("think")
    assert err.value.status_code == 501
    r = httpx.post(server.url + "/api/chat", json={"model": "think", "messages": HELLO})  # no key
    assert r.status_code == 401 and set(r.json()) == {"error"}
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={"model": "nope", "messages": HELLO})
    assert r.status_code == 404 and isinstance(r.json()["error"], dict)  # OpenAI's routes keep OpenAI's shape


def test_a_long_conversation_loses_its_oldest_messages(client: ollama.Client, server: BackgroundServer) -> None:
    """As Ollama's chat: system messages and the last message stay, the fewest older ones go ("tiny" has a
    512-token context, its tokenizer about a token a character)."""
    history = [{"role": role, "content": f"message {i}: " + "words " * 20} for i, role in
               enumerate(["user", "assistant"] * 3)]
    system, last = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}

    def fits(messages: list[dict[str, str]]) -> int | None:  # prompt tokens on /v1, None for a 400
        r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={
            "model": "tiny", "messages": messages, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code in (200, 400), r.text
        return r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else None

    whole = [system, *history, last]
    assert fits(whole) is None  # too long as it stands
    kept = next(k for k in range(len(history)) if fits([system, *history[k:], last]) is not None)
    assert 0 < kept < len(history)  # some dropped, some kept: the test means something
    r = chat(client, model="tiny", messages=whole, think=False, options={"num_predict": 1})
    assert r.prompt_eval_count == fits([system, *history[kept:], last])
    refused = httpx.post(server.url + "/api/chat", headers=AUTH, json={
        "model": "tiny", "messages": whole, "think": False, "stream": False, "truncate": False})
    assert refused.status_code == 400 and "context length" in refused.json()["error"]
    with pytest.raises(ollama.ResponseError) as err:  # the last message alone is too long: nothing to drop
        chat(client, model="tiny", messages=[system, *history, {"role": "user", "content": "why " * 400}])
    assert err.value.status_code == 400


def test_logprobs_as_ollama_returns_them(client: ollama.Client) -> None:
    """One entry per generated token (thinking included), with top_logprobs alternatives; streamed lines carry
    the tokens they bring, and together they are the whole answer's."""
    whole = chat(client, logprobs=True, top_logprobs=2)
    assert len(whole.logprobs) == whole.eval_count > 0
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in whole.logprobs)
    assert "".join(e.token for e in whole.logprobs) == (  # the end-of-turn token too, as eval_count counts it
        f"<think>\n{whole.message.thinking}\n</think>\n\n{whole.message.content}<|im_end|>")
    parts = list(chat(client, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for p in parts for e in (p.logprobs or [])]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.logprobs]
    raw = client.generate(model="tiny", prompt="The weather", raw=True, logprobs=True,
                          options={**GREEDY, "num_predict": 5})
    assert [e.token for e in raw.logprobs] and "".join(e.token for e in raw.logprobs) == raw.response
    assert chat(client).logprobs is None  # not asked for: not sent


def test_error_after_the_stream_started_is_an_error_line(client: ollama.Client, server: BackgroundServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fail_after_first_output(monkeypatch, server.models["think"].engine)
    with pytest.raises(ollama.ResponseError) as err:
        list(chat(client, stream=True))
    assert err.value.error == "internal error: RuntimeError: the engine broke"


def test_images_become_image_parts() -> None:
    body = OllamaChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "look", "images": ["iVBORw0KGgo="]}]})
    (message,) = translate.chat_request(body).messages
    assert [p.type for p in message.content] == ["image_url", "text"]
    assert message.content[0].image_url.url == "data:image/*;base64,iVBORw0KGgo="


def test_openapi_documents_ollama_errors(server: BackgroundServer) -> None:
    doc = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    op = doc["paths"]["/api/chat"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaChatRequest")
    assert op["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaErrorResponse")
    assert "application/x-ndjson" in op["responses"]["200"]["content"]
    ps = doc["paths"]["/api/ps"]["get"]["responses"]["500"]["content"]["application/json"]["schema"]
    assert ps["$ref"].endswith("/OllamaErrorResponse")


def test_a_body_without_a_content_type_is_read_as_json(server: BackgroundServer) -> None:
    # Ollama reads any body as JSON, and LiteLLM's ollama providers send theirs with no Content-Type (sync) or as
    # application/octet-stream (async). Neither is a cross-site form post: a browser sends an Origin with those.
    body = json.dumps({"model": "think", "messages": HELLO, "stream": False, "options": GREEDY}).encode()
    # curl -d, as every example of Ollama's documentation is written, sends form-urlencoded.
    for headers in ({}, {"Content-Type": "application/octet-stream"},
                    {"Content-Type": "application/x-www-form-urlencoded"}):
        r = httpx.post(server.url + "/api/chat", content=body, headers={**AUTH, **headers}, timeout=30)
        assert r.status_code == 200 and r.json()["message"]["content"] == ANSWER, headers
    r = httpx.post(server.url + "/api/chat", content=body, headers={**AUTH, "Origin": "https://evil.example"})
    assert r.status_code == 415 and set(r.json()) == {"error"}
