"""llama.cpp server's native routes (POST /completion, GET /props, /tokenize's `content`) driven as llama-server's
clients drive them, against the tiny random Qwen3 through the real engine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def url(tiny_qwen3: Path) -> Iterator[str]:
    with BackgroundServer(create_app([tiny_served_model(tiny_qwen3, "tiny")], ServerConfig(enable_ui=False))) as srv:
        yield srv.url


def complete(url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(url + "/completion", json={"prompt": "The weather", **GREEDY, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(url: str, **body: Any) -> list[dict[str, Any]]:
    lines = []
    with httpx.stream("POST", url + "/completion", json={"prompt": "The weather", "stream": True, **GREEDY, **body},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ") and line != "data: [DONE]"  # llama.cpp sends no [DONE]
                lines.append(json.loads(line.removeprefix("data: ")))
    return lines


def test_completion_matches_v1_completions_and_says_why_it_stopped(url: str) -> None:
    whole = complete(url, n_predict=12)
    v1 = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "The weather", "max_tokens": 12,
                                                   **GREEDY}).json()
    assert whole["content"] == v1["choices"][0]["text"] and whole["stop"] is True
    assert (whole["stop_type"], whole["tokens_predicted"]) == ("limit", 12)
    assert whole["tokens_evaluated"] == v1["usage"]["prompt_tokens"] and whole["model"] == "tiny"
    assert whole["timings"]["predicted_n"] == 12 and whole["timings"]["predicted_ms"] >= 0
    word = whole["content"][3:6]  # a stop string the greedy answer is known to reach
    stopped = complete(url, n_predict=12, stop=[word])
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == word
    assert stopped["content"] == whole["content"][: whole["content"].index(word)]


def test_n_predict_zero_evaluates_the_prompt_only(url: str) -> None:
    """llama.cpp's way to prime its cache: nothing generated comes back (it was once "until the context's end")."""
    whole = complete(url, n_predict=0)
    assert (whole["content"], whole["tokens_predicted"], whole["stop_type"]) == ("", 0, "limit")
    assert whole["tokens_evaluated"] > 0
    lines = streamed(url, n_predict=0)
    assert [line["content"] for line in lines] == [""] and lines[-1]["tokens_predicted"] == 0


def test_stream_reassembles_to_the_whole_answer(url: str) -> None:
    lines = streamed(url, n_predict=10)
    assert all(not line["stop"] for line in lines[:-1]) and lines[-1]["stop"] and lines[-1]["content"] == ""
    assert "".join(line["content"] for line in lines) == complete(url, n_predict=10)["content"]
    assert lines[-1]["stop_type"] == "limit" and lines[-1]["tokens_predicted"] == 10


def test_grammar_and_json_schema_hold_the_answer(url: str) -> None:
    assert complete(url, grammar='root ::= "north" | "south"', temperature=1.0, seed=3)["content"] in ("north", "south")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = complete(url, json_schema=schema, n_predict=40)
    assert isinstance(json.loads(answer["content"])["ok"], bool) and answer["stop_type"] == "eos"


def test_bad_requests_are_400s_and_unknown_models_404s(url: str) -> None:
    for body, status in (({"n_predict": "many"}, 400), ({"grammar": "root ::= ("}, 400), ({"model": "nope"}, 404),
                         ({"prompt": [10**9]}, 400)):
        r = httpx.post(url + "/completion", json={"prompt": "x", **body})
        assert r.status_code == status and "message" in r.json()["error"], (body, r.text)


def test_props_and_tokenize_in_llama_cpps_words(url: str) -> None:
    props = httpx.get(url + "/props").json()
    assert props["default_generation_settings"]["n_ctx"] > 0 and props["total_slots"] >= 1
    assert props["model_path"] == "tiny" and "im_start" in props["chat_template"]
    tokens = httpx.post(url + "/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert tokens == httpx.post(url + "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert httpx.post(url + "/detokenize", json={"tokens": tokens}).json()["content"] == "hello world"
    both = httpx.post(url + "/tokenize", json={"content": "a", "prompt": "b"})
    assert both.status_code == 400
