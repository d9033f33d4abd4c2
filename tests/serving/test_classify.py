"""Sequence classifiers through a real uvicorn on loopback: POST /classify in vLLM's shape against transformers'
logits, a Qwen3-Reranker converted to one label (vLLM's "seq-cls" form) answering /v1/rerank and /score as the
original does, and the refusals (a chat model asked to classify, a classifier asked to chat or to rerank with
three labels) in OpenAI's error shape."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

from classifier_checkpoints import SENTIMENT, build_classifier_checkpoint, convert_reranker, hf_classifier_logits
from rerank_checkpoints import build_reranker_checkpoint, hf_rerank
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

CLS, SEQ_CLS, RR, CHAT = "sentiment", "reranker-seq-cls", "reranker", "tiny"
TEXTS = ["I loved it", "it was fine", "the worst day"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    reranker = build_reranker_checkpoint(tmp_path_factory.mktemp("reranker"), seed=11)
    return {CLS: build_classifier_checkpoint(tmp_path_factory.mktemp("sentiment"), seed=5),
            SEQ_CLS: convert_reranker(reranker, tmp_path_factory.mktemp("seq-cls")), RR: reranker}


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path], tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    models = [tiny_served_model(path, name) for name, path in dirs.items()] + [tiny_served_model(tiny_qwen3, CHAT)]
    with BackgroundServer(create_app(models, ServerConfig(ui_db_path=":memory:"))) as srv:
        srv.models = {m.name: m for m in models}  # type: ignore[attr-defined]
        yield srv


def post(server: BackgroundServer, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    return response.json()


def test_classify_matches_transformers_in_vllms_shape(server: BackgroundServer, dirs: dict[str, Path]) -> None:
    got = post(server, "/classify", {"model": CLS, "input": TEXTS})
    tokenizer = server.models[CLS].tokenizer  # type: ignore[attr-defined]
    prompts = [tokenizer.encode(t) for t in TEXTS]
    want = hf_classifier_logits(dirs[CLS], prompts).softmax(-1)
    assert got["object"] == "list" and got["id"].startswith("classify-") and got["model"] == CLS
    assert [d["index"] for d in got["data"]] == [0, 1, 2]
    torch.testing.assert_close(torch.tensor([d["probs"] for d in got["data"]]), want, atol=1e-5, rtol=1e-4)
    assert [d["label"] for d in got["data"]] == [SENTIMENT[i] for i in want.argmax(-1).tolist()]
    assert all(d["num_classes"] == 3 for d in got["data"])
    tokens = sum(map(len, prompts))
    assert got["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def test_classify_takes_token_ids_and_one_string(server: BackgroundServer) -> None:
    one = post(server, "/v1/classify", {"model": CLS, "input": TEXTS[0]})["data"]
    ids = server.models[CLS].tokenizer.encode(TEXTS[0])  # type: ignore[attr-defined]
    by_ids = post(server, "/classify", {"model": CLS, "input": ids})["data"]
    assert len(one) == 1 and one[0]["probs"] == pytest.approx(by_ids[0]["probs"], abs=1e-6)
    last_two = post(server, "/classify", {"model": CLS, "input": [ids], "truncate_prompt_tokens": 2})
    assert last_two["usage"]["prompt_tokens"] == 2


def test_classify_and_embeddings_take_vllms_chat_form(server: BackgroundServer) -> None:
    """`messages` in place of `input` (vLLM's chat form of the pooling requests): the conversation rendered as
    /tokenize renders it (no generation prompt unless asked), then pooled as those token ids would be."""
    messages = [{"role": "system", "content": "Rate the review."}, {"role": "user", "content": TEXTS[0]}]
    for add_generation_prompt in (False, True):
        ids = post(server, "/tokenize", {"model": CLS, "messages": messages,
                                         "add_generation_prompt": add_generation_prompt})["tokens"]
        got = post(server, "/classify", {"model": CLS, "messages": messages,
                                         "add_generation_prompt": add_generation_prompt})
        want = post(server, "/classify", {"model": CLS, "input": ids})
        assert got["data"][0]["probs"] == pytest.approx(want["data"][0]["probs"], abs=1e-6)
        assert got["usage"]["prompt_tokens"] == len(ids)
    ids = post(server, "/tokenize", {"model": CHAT, "messages": messages, "add_generation_prompt": False})["tokens"]
    served = server.models[CHAT]  # type: ignore[attr-defined]
    pooled = served.pooling.with_end_token(ids, served.tokenizer)  # what a text gets appended, as /v1/embeddings does
    got = post(server, "/v1/embeddings", {"model": CHAT, "messages": messages})["data"][0]["embedding"]
    want = post(server, "/v1/embeddings", {"model": CHAT, "input": pooled})["data"][0]["embedding"]
    assert got == pytest.approx(want, abs=1e-6)
    last = post(server, "/classify", {"model": CLS, "messages": messages, "truncate_prompt_tokens": 3})
    assert last["usage"]["prompt_tokens"] == 3


def test_a_converted_reranker_reranks_as_the_original(server: BackgroundServer, dirs: dict[str, Path]) -> None:
    docs = ["Paris is the capital of France.", "2 + 2 = 4", "Berlin is the capital of Germany."]
    want, _ = hf_rerank(dirs[RR], "capital of France", docs)
    for model in (SEQ_CLS, RR):
        results = post(server, "/v1/rerank", {"model": model, "query": "capital of France", "documents": docs})
        got = [r["relevance_score"] for r in sorted(results["results"], key=lambda r: r["index"])]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
    scores = post(server, "/score", {"model": SEQ_CLS, "text_1": "capital of France", "text_2": docs})["data"]
    torch.testing.assert_close(torch.tensor([d["score"] for d in scores]), torch.tensor(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path, body, code", [
    ("/classify", {"model": CHAT, "input": "hello"}, "model_cannot_classify"),
    ("/classify", {"model": CLS, "input": ""}, None),
    ("/classify", {"model": CLS, "input": [[1, 2], []]}, None),
    ("/classify", {"model": CLS, "input": [10**9]}, None),
    ("/classify", {"model": CLS, "input": "word " * 5000}, "context_length_exceeded"),
    ("/v1/rerank", {"model": CLS, "query": "q", "documents": ["d"]}, "model_cannot_rerank"),
    ("/v1/chat/completions", {"model": CLS, "messages": [{"role": "user", "content": "hi"}]}, "model_not_generative"),
    ("/v1/completions", {"model": SEQ_CLS, "prompt": "hi"}, "model_not_generative"),
    ("/classify", {"model": CLS, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}, None),
    ("/classify", {"model": CLS}, None),
    ("/classify", {"model": CLS, "messages": []}, None),
    ("/classify", {"model": CLS, "messages": [{"role": "user", "content": "word " * 5000}]}, "context_length_exceeded"),
    ("/v1/embeddings", {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "prompt_name": "query"}, None),
])
def test_refusals_are_400s_in_openais_shape(server: BackgroundServer, path: str, body: dict[str, Any],
                                            code: str | None) -> None:
    error = post(server, path, body, status=400)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error
    if code == "model_not_generative":
        assert "/classify" in error["message"]


def test_a_classifier_still_embeds_and_says_what_it_does(server: BackgroundServer) -> None:
    vectors = post(server, "/v1/embeddings", {"model": CLS, "input": ["a", "b"]})["data"]
    assert len(vectors) == 2 and len(vectors[0]["embedding"]) == 64
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
    assert cards[CLS]["capabilities"] == ["classification", "embedding"]
