"""The OpenAI-compatible server driven by the official `openai` SDK (sync and async, streamed and not)
against a real uvicorn on loopback with a tiny random Qwen3: chat, completions, models, logprobs, n > 1,
stop strings, seeds, usage counts, echo with logprobs, tokenize, metrics."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from scripted import build_case
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ModelSpec, ServerConfig
from qwenstack.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to Paris."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def server(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    # "scripted" says a fixed thinking-then-answer text (tests/scripted.py): room for grammars to finish.
    scripted = build_case(tmp_path_factory.mktemp("scripted"), "think_answer")
    models = [tiny_served_model(tiny_qwen3), tiny_served_model(scripted.path, "scripted")]
    app = create_app(models, ServerConfig(ui_db_path=":memory:"))
    with BackgroundServer(app) as srv:
        srv.app = app  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def tok(tiny_qwen3: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_qwen3)


def prompt_len(tok: Tokenizer, messages: list[dict], **kwargs: Any) -> int:
    kwargs.setdefault("enable_thinking", True)
    return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)))


def test_models_health_version(server: BackgroundServer, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "scripted"]
    card = models[0].model_dump()
    assert card["capabilities"] == ["chat", "completion"] and card["max_model_len"] == 512
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/").status_code == 200  # the chat page
    assert client.models.retrieve("scripted").id == "scripted"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_kv_memory_is_shared_between_models() -> None:
    config = ServerConfig(kv_cache_memory=900, models=[ModelSpec("a"), ModelSpec("b", kv_cache_memory=300),
                                                       ModelSpec("c")])
    assert [config.kv_memory_for(m) for m in config.models] == [300, 300, 300]


def test_chat_usage_equals_tokenizer_counts(client: openai.OpenAI, tok: Tokenizer) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and choice.message.role == "assistant"
    assert r.usage.prompt_tokens == prompt_len(tok, MESSAGES)
    assert r.usage.completion_tokens == len(choice.logprobs.content) <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    # Whatever the random model says is split into reasoning and content, never lost.
    message = choice.message.model_dump()
    assert message["reasoning_content"] == message["reasoning"]
    assert (message["content"] or "") + (message["reasoning_content"] or "") != "" or r.usage.completion_tokens <= 1


def test_stream_reassembles_to_non_streamed(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == (full.choices[0].message.content or "")
    assert reasoning == (getattr(full.choices[0].message, "reasoning_content", None) or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    # include_usage: a last chunk with no choices and the usage; every other chunk says usage null.
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump()["prompt_tokens"] == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_stream_and_not(server: BackgroundServer) -> None:
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            full = await aclient.chat.completions.create(model="tiny", messages=MESSAGES,
                                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                                                         **GREEDY)
            stream = await aclient.chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                                                           **GREEDY)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return full.choices[0].message.content or "", text

    full, streamed = asyncio.run(run())
    assert full == streamed


def test_thinking_switches_change_the_prompt(client: openai.OpenAI, tok: Tokenizer) -> None:
    off = prompt_len(tok, MESSAGES, enable_thinking=False)
    assert off != prompt_len(tok, MESSAGES)
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"},
                  {"reasoning_effort": "minimal"}, {"reasoning_effort": "None"}):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body=extra, **GREEDY)
        assert r.usage.prompt_tokens == off
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
    soft = [{"role": "user", "content": "Hi /no_think"}]  # a soft switch is just text for the template
    r = client.chat.completions.create(model="tiny", messages=soft, **GREEDY)
    assert r.usage.prompt_tokens == prompt_len(tok, soft)


def test_continue_final_message_goes_on_writing_the_prefill(server: BackgroundServer, client: openai.OpenAI,
                                                             tok: Tokenizer) -> None:
    """vLLM's continue_final_message: the prompt ends with the last (assistant) message's text, not with its
    end of turn, and the answer is only what follows it: the same tokens as a plain completion of that text."""
    prefill = "Hello, Paris"
    messages = MESSAGES + [{"role": "assistant", "content": prefill}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False, enable_thinking=True)
    prompt = rendered[:rendered.rfind(prefill) + len(prefill)]
    assert not prompt.endswith("<|im_end|>\n") and prompt.endswith(prefill)
    chat = client.chat.completions.create(model="tiny", messages=messages, **GREEDY,
                                          extra_body={"continue_final_message": True})
    plain = client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    assert chat.choices[0].message.content == plain.choices[0].text and not chat.choices[0].message.content.startswith(
        prefill)
    assert chat.usage.prompt_tokens == len(tok.encode(prompt))
    for extra, last in [({"continue_final_message": True}, MESSAGES),  # nothing of the assistant's to continue
                        ({"continue_final_message": True, "add_generation_prompt": True}, messages)]:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": last, **extra})
        assert r.status_code == 400 and "continue_final_message" in r.json()["error"]["message"], r.text


def test_reasoning_effort_means_what_it_means_in_responses() -> None:
    """low and medium cap the thinking (an explicit budget wins), high and xhigh leave it unbounded, and an
    effort OpenAI does not have is a 400 naming the field."""
    from pydantic import ValidationError

    from qwenstack.serving.protocol import ChatCompletionRequest

    def request(**fields: object) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})

    budgets = [request(reasoning_effort=e).thinking_budget_tokens for e in ("low", "medium", "high", "xhigh")]
    assert budgets == [1024, 8192, None, None]
    assert request(reasoning_effort="low", thinking_budget=7).thinking_budget_tokens == 7
    assert [request(reasoning_effort=e).thinking_off for e in ("none", "minimal", "low")] == [True, True, False]
    with pytest.raises(ValidationError, match="reasoning_effort"):
        request(reasoning_effort="extreme")


def test_history_with_reasoning_and_tools(client: openai.OpenAI, tok: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
               {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "I should call it."},
               {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}]
    rendered = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "reasoning_content": "I should call it.",
                 "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=tools, **GREEDY)
    assert r.usage.prompt_tokens == prompt_len(tok, rendered, tools=tools)
    # The other name for the reasoning is accepted too.
    history[1] = {**history[1], "reasoning": history[1].pop("reasoning_content")}
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=tools, **GREEDY)
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens
    # tool_choice none: the tools are not rendered at all.
    r3 = client.chat.completions.create(model="tiny", messages=history, tools=tools, tool_choice="none", **GREEDY)
    assert r3.usage.prompt_tokens == prompt_len(tok, rendered)


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and isinstance(entry.bytes, list)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the chosen one is the top one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top_logprobs, entry.top_logprobs[1:]))
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert (r.choices[0].message.content or "") in joined


def test_n_samples_and_seed(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=1.0, max_tokens=10, seed=7)
    r = client.chat.completions.create(n=3, logprobs=True, **kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    again = client.chat.completions.create(n=3, logprobs=True, **kwargs)
    texts = lambda resp: [(c.message.content, getattr(c.message, "reasoning_content", None)) for c in resp.choices]
    assert texts(r) == texts(again)  # the same seed gives the same samples
    assert len(set(texts(r))) > 1  # and the samples of one request differ
    other = client.chat.completions.create(n=3, **{**kwargs, "seed": 8})
    assert texts(other) != texts(r)
    stream = client.chat.completions.create(n=2, stream=True, **kwargs)
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason}
    assert set(finished) == {0, 1}


def test_stop_string(client: openai.OpenAI) -> None:
    args = dict(model="tiny", prompt="The quick brown fox", temperature=0, max_tokens=24,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2)
                if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2] and full[i:i + 2] not in full[:i + 1])
    cut = client.completions.create(stop=[stop], **args).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    chunks = [c for c in client.completions.create(stop=stop, stream=True, **args) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == cut.text
    # vLLM's stop_reason (the stop string that ended it) in the whole response and in the stream's last choice
    assert cut.stop_reason == stop and chunks[-1].choices[0].stop_reason == stop  # type: ignore[attr-defined]
    messages = [{"role": "user", "content": "The quick brown fox"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, stop=[stop], **GREEDY).choices[0]
    last = [c for c in client.chat.completions.create(model="tiny", messages=messages, stop=[stop], stream=True,
                                                      **GREEDY) if c.choices][-1].choices[0]
    assert last.finish_reason == whole.finish_reason and last.stop_reason == whole.stop_reason  # type: ignore


def test_completion_prompt_forms(client: openai.OpenAI, tok: Tokenizer) -> None:
    ids = tok.encode("Paris is the capital")
    by_text = client.completions.create(model="tiny", prompt="Paris is the capital", temperature=0, max_tokens=6)
    by_ids = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=6)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    many = client.completions.create(model="tiny", prompt=["Paris is the capital", "To be, or not"], n=2,
                                     temperature=0, max_tokens=6)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text
    assert many.usage.prompt_tokens == len(ids) + len(tok.encode("To be, or not"))
    lists = client.completions.create(model="tiny", prompt=[ids, tok.encode("To be, or not")], temperature=0,
                                      max_tokens=6)
    assert [c.text for c in lists.choices] == [many.choices[0].text, many.choices[2].text]


def test_echo_with_logprobs_for_scoring(client: openai.OpenAI, tok: Tokenizer) -> None:
    prompt = "Berlin is the capital of Germany."
    ids = tok.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 3 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens[: len(ids)]) == prompt
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(logprob)  # the chosen token is listed with the top ones
    # max_tokens 0 scores the prompt alone (lm-evaluation-harness's loglikelihood requests).
    scored = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    scored_lp = scored.choices[0].logprobs.token_logprobs
    assert scored_lp[0] is None and scored_lp[1:] == pytest.approx(lp.token_logprobs[1: len(ids)], abs=1e-4)
    stream = list(client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=3,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    assert sum(len(c.choices[0].logprobs.tokens) for c in stream) == len(lp.tokens)


def test_tokenize_detokenize(server: BackgroundServer, tok: Tokenizer) -> None:
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    chat = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": MESSAGES}).json()
    assert chat["count"] == prompt_len(tok, MESSAGES)
    back = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hello world", "content": "Hello world"}  # vLLM's name and llama.cpp's


def test_metrics_by_model(server: BackgroundServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
                 "generation_tokens_total"):
        assert f'qwenstack:{name}{{model_name="tiny"}}' in text, name
    assert 'qwenstack:request_success_total{finished_reason="length",model_name="tiny"}' in text \
        or 'qwenstack:request_success_total{finished_reason="stop",model_name="tiny"}' in text


TRIP = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
        "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 9}}}


def valid_trip(text: str | None) -> bool:
    value = json.loads(text or "")
    return set(value) == {"city", "days"} and value["city"] in ("Paris", "Berlin") and 1 <= value["days"] <= 9


@pytest.mark.parametrize("thinking", [True, False])
def test_response_format_json_schema(client: openai.OpenAI, thinking: bool) -> None:
    args = dict(model="scripted", messages=MESSAGES, temperature=0, max_tokens=120, n=2,
                response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP}},
                extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    r = client.chat.completions.create(**args)
    for choice in r.choices:
        assert choice.finish_reason == "stop" and valid_trip(choice.message.content)
        # The grammar applies after the thinking, which stays in its own field.
        assert bool(getattr(choice.message, "reasoning_content", None)) == thinking
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args)
                       if c.choices and c.choices[0].index == 0)
    assert streamed == r.choices[0].message.content
    # json_object: any object (this model fills a free-form key until max_tokens, so only its start is checked).
    obj = client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=0, max_tokens=8,
                                         response_format={"type": "json_object"}, reasoning_effort="none")
    assert obj.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "plan_trip"}}])
def test_forced_tool_call(client: openai.OpenAI, tool_choice: Any) -> None:
    tools = [{"type": "function", "function": {"name": "plan_trip", "parameters": TRIP}}]
    args = dict(model="scripted", messages=MESSAGES, temperature=0, max_tokens=120, tools=tools,
                tool_choice=tool_choice, reasoning_effort="none")
    r = client.chat.completions.create(**args)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert [c.function.name for c in calls] == ["plan_trip"] and valid_trip(calls[0].function.arguments)
    fragments = [tc for c in client.chat.completions.create(stream=True, **args) if c.choices
                 for tc in c.choices[0].delta.tool_calls or []]
    assert fragments[0].id and fragments[0].function.name == "plan_trip"
    assert "".join(f.function.arguments or "" for f in fragments) == calls[0].function.arguments
