"""POST /v1/rerank (and /rerank, /v2/rerank, /score) against a real uvicorn on loopback, serving tiny random
Qwen3-Reranker checkpoints (plain Qwen3ForCausalLM, tied and untied head): parity with the model card's
transformers recipe, ordering, top_n, return_documents, `{"text": ...}` documents, usage, vLLM's pre-formatted
prompts, one pass or several, refusals in OpenAI's error shape, and a chat stream that a rerank runs beside.
Also the scoring core: two head rows give the full logits' two columns, whatever form the head takes."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
import torch

from embedding_checkpoints import build_embedding_checkpoint
from rerank_checkpoints import CARD_PREFIX, CARD_SUFFIX, CARD_TASK, build_reranker_checkpoint, hf_rerank
from server_utils import BackgroundServer, before_each_step, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.rerank import MAX_DOCUMENTS

RR, UNTIED, SMALL_PASSES, EMB, CHAT = "reranker", "reranker-untied", "reranker-small-passes", "embedding", "tiny"
QUERY = "capital of France"
DOCS = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog.", "2 + 2 = 4",
        "Berlin is the capital of Germany.", "To be, or not to be"]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reranker_checkpoint(tmp_path_factory.mktemp("reranker"), seed=11)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reranker_checkpoint(tmp_path_factory.mktemp("reranker-untied"), seed=12, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def server(reranker_dir: Path, untied_dir: Path, tiny_qwen3: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    embedding_dir = build_embedding_checkpoint(tmp_path_factory.mktemp("embedding"), seed=3)
    models = [tiny_served_model(reranker_dir, RR), tiny_served_model(untied_dir, UNTIED),
              tiny_served_model(reranker_dir, SMALL_PASSES, max_num_batched_tokens=100),  # about one pair a pass
              tiny_served_model(embedding_dir, EMB), tiny_served_model(tiny_qwen3, CHAT)]
    with BackgroundServer(create_app(models, ServerConfig(ui_db_path=":memory:"))) as srv:
        srv.models = {m.name: m for m in models}  # type: ignore[attr-defined]
        yield srv


def rerank(server: BackgroundServer, path: str = "/v1/rerank", **body: Any) -> dict[str, Any]:
    response = httpx.post(server.url + path, json={"model": RR, "query": QUERY, "documents": DOCS, **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def by_index(results: list[dict[str, Any]]) -> list[float]:
    return [r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])]


@pytest.mark.parametrize("model, instruction", [(RR, None), (UNTIED, None), (RR, "Find the city named")])
def test_scores_match_the_model_cards_transformers_recipe(server: BackgroundServer, reranker_dir: Path, untied_dir: Path,
                                                          model: str, instruction: str | None) -> None:
    extra = {} if instruction is None else {"instruction": instruction}
    got = rerank(server, model=model, **extra)
    want, lengths = hf_rerank(reranker_dir if model == RR else untied_dir, QUERY, DOCS, instruction)
    torch.testing.assert_close(torch.tensor(by_index(got["results"])), torch.tensor(want), atol=1e-4, rtol=0)
    assert got["usage"] == {"total_tokens": sum(lengths)}
    assert got["model"] == model and got["id"].startswith("rerank-")


def test_results_are_sorted_and_cut_to_top_n(server: BackgroundServer) -> None:
    full = rerank(server)["results"]
    scores = [r["relevance_score"] for r in full]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(DOCS)
    assert sorted(r["index"] for r in full) == list(range(len(DOCS)))
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in full)
    top = rerank(server, top_n=2)
    assert top["results"] == full[:2]
    assert top["usage"] == rerank(server)["usage"]  # every document is scored, whatever top_n keeps
    assert rerank(server, top_n=len(DOCS) + 10)["results"] == full


def test_documents_as_objects_without_documents_back(server: BackgroundServer) -> None:
    full = rerank(server)
    bare = rerank(server, documents=[{"text": d} for d in DOCS], return_documents=False)
    assert all(set(r) == {"index", "relevance_score"} for r in bare["results"])
    assert [(r["index"], r["relevance_score"]) for r in bare["results"]] == \
        [(r["index"], r["relevance_score"]) for r in full["results"]]
    assert bare["usage"] == full["usage"]


def test_vllm_paths_and_score_give_the_same_scores(server: BackgroundServer) -> None:
    full = rerank(server)
    for path in ("/rerank", "/v2/rerank"):
        assert rerank(server, path)["results"] == full["results"]
    scored = httpx.post(server.url + "/score", json={"model": RR, "text_1": QUERY, "text_2": DOCS}).json()
    assert [d["index"] for d in scored["data"]] == list(range(len(DOCS)))
    assert [d["score"] for d in scored["data"]] == by_index(full["results"])
    assert scored["object"] == "list" and scored["usage"]["prompt_tokens"] == full["usage"]["total_tokens"]
    pairwise = httpx.post(server.url + "/v1/score", json={"model": RR, "text_1": [QUERY, QUERY], "text_2": DOCS[:2]})
    # Two pairs in a pass against five: a float32 GEMM may sum in another order for another row count (Intel's
    # MKL does), so equal to rounding, not bit for bit.
    assert [d["score"] for d in pairwise.json()["data"]] == pytest.approx(by_index(full["results"])[:2], abs=1e-6)


def test_a_query_formatted_as_vllms_client_does_is_not_wrapped_again(server: BackgroundServer) -> None:
    """vLLM's examples/online_serving/qwen3_rerank_client.py sends the prompt's pieces already formatted."""
    query = f"{CARD_PREFIX}<Instruct>: {CARD_TASK}\n<Query>: {QUERY}\n"
    documents = [f"<Document>: {d}{CARD_SUFFIX}" for d in DOCS]
    formatted = rerank(server, query=query, documents=documents)
    plain = rerank(server)
    assert formatted["usage"] == plain["usage"]
    torch.testing.assert_close(torch.tensor(by_index(formatted["results"])), torch.tensor(by_index(plain["results"])),
                               atol=1e-6, rtol=0)


def test_one_pass_or_several_give_the_same_scores(server: BackgroundServer) -> None:
    docs = DOCS + [" ".join(DOCS), "fox"]  # one pair longer than the small budget: it runs alone
    one = rerank(server, documents=docs)
    several = rerank(server, documents=docs, model=SMALL_PASSES)
    torch.testing.assert_close(torch.tensor(by_index(several["results"])), torch.tensor(by_index(one["results"])),
                               atol=1e-5, rtol=0)
    assert several["usage"] == one["usage"]


def test_a_chat_stream_goes_on_while_reranks_run(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rerank's passes run in the engine thread between two steps of the stream: neither sees the other."""
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    alone_scores = by_index(rerank(server)["results"])

    async def chat(during: bool) -> tuple[str, str | None, list[list[float]]]:
        stream = await aclient.chat.completions.create(
            model=RR, messages=[{"role": "user", "content": "Tell me about Paris"}], max_tokens=24, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        text, finish, pending = [], None, []
        async with httpx.AsyncClient(timeout=30) as http:
            async for chunk in stream:
                for choice in chunk.choices:
                    delta = choice.delta.model_dump()
                    text += [delta.get("content") or "", delta.get("reasoning_content") or ""]
                    finish = choice.finish_reason or finish
                if during and len(pending) < 3:  # a rerank started at each of the first chunks
                    pending.append(asyncio.create_task(http.post(
                        server.url + "/v1/rerank", json={"model": RR, "query": QUERY, "documents": DOCS})))
            done = [(await task).json() for task in pending]
        return "".join(text), finish, [by_index(d["results"]) for d in done]

    async def both() -> tuple[Any, Any]:
        try:
            alone = await chat(during=False)
            before_each_step(monkeypatch, server.models[RR].engine.engine, lambda: time.sleep(0.01))  # type: ignore
            return alone, await chat(during=True)
        finally:
            await aclient.close()

    (alone_text, alone_finish, _), (text, finish, scores) = asyncio.run(both())
    assert finish == alone_finish == "length" and text == alone_text
    assert len(scores) == 3
    for got in scores:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(alone_scores), atol=1e-5, rtol=0)


BAD_BODIES: dict[str, dict[str, Any]] = {
    "empty documents": {"documents": []},
    "too many documents": {"documents": ["x"] * (MAX_DOCUMENTS + 1)},
    "top_n zero": {"top_n": 0},
    "top_n negative": {"top_n": -3},
    "top_n a string": {"top_n": "2"},
    "document a number": {"documents": ["a", 5]},
    "document object without text": {"documents": [{"content": "a"}]},
    "no query": {"query": None},
    "query a list": {"query": ["a"]},
    "instruction a number": {"instruction": 7},
    "return_documents a string": {"return_documents": "no"},
    "document longer than the context": {"documents": ["short", " ".join(["Paris"] * 700)]},
    "query longer than the context": {"query": " ".join(["Paris"] * 700)},
    "an embedding model": {"model": EMB},
    "a vocabulary without yes and no": {"model": CHAT},
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_requests_are_400s_in_openais_shape(server: BackgroundServer, case: str) -> None:
    body = {"model": RR, "query": QUERY, "documents": DOCS, **BAD_BODIES[case]}
    response = httpx.post(server.url + "/v1/rerank", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if case == "document longer than the context":
        assert error["code"] == "context_length_exceeded" and error["param"] == "documents"
        assert error["message"].startswith("document 1:") and "512" in error["message"]
    if case == "query longer than the context":
        assert error["code"] == "context_length_exceeded" and error["param"] == "query"
    if "model" in case or "vocabulary" in case:
        assert error["code"] == "model_cannot_rerank" and error["param"] == "model"
    if case == "too many documents":
        assert str(MAX_DOCUMENTS) in error["message"]


def test_unknown_model_is_a_404_and_mismatched_score_lists_a_400(server: BackgroundServer) -> None:
    missing = httpx.post(server.url + "/v1/rerank", json={"model": "nope", "query": QUERY, "documents": DOCS})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    mismatched = httpx.post(server.url + "/score", json={"model": RR, "text_1": ["a", "b"], "text_2": DOCS})
    assert mismatched.status_code == 400 and mismatched.json()["error"]["param"] == "text_1"


def test_two_head_rows_give_the_full_logits_columns(reranker_dir: Path, untied_dir: Path) -> None:
    """lm_logits with token_ids, for each form an lm_head takes: tied (the embedding), plain, tile-packed
    (bfloat16, native kernels), oneDNN-packed and int8 (both only multiply: cut from the full logits)."""
    from qwenstack import kernels
    from qwenstack.models import cpu_linear
    from qwenstack.models.registry import load_model
    from qwenstack.quantization import quantize_model

    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([278, 279])
    tied, untied = load_model(reranker_dir, dtype=torch.float32), load_model(untied_dir, dtype=torch.float32)
    assert tied.lm_head is None
    heads: list[tuple[str, Any, torch.dtype]] = [("tied", tied, torch.float32), ("plain", untied, torch.float32)]
    weight = untied.lm_head.weight.detach()
    if kernels.can_tile(weight.to(torch.bfloat16)):
        tiled = load_model(untied_dir, dtype=torch.bfloat16)
        tiled.lm_head = cpu_linear.TiledLinear(tiled.lm_head.weight.detach())
        heads.append(("tile-packed", tiled, torch.bfloat16))
    if cpu_linear.packing_supported():
        packed = load_model(untied_dir, dtype=torch.float32)
        packed.lm_head = cpu_linear.PackedLinear(weight)
        heads.append(("oneDNN-packed", packed, torch.float32))
    int8 = load_model(untied_dir, dtype=torch.float32)
    quantize_model(int8, "int8")
    assert type(int8.lm_head).__name__ == "QuantLinear"
    heads.append(("int8", int8, torch.float32))
    for name, model, dtype in heads:
        h = hidden.to(dtype)
        full = model.compute_logits(h)[:, ids]
        torch.testing.assert_close(model.compute_logits(h, ids), full, atol=1e-5 if dtype == torch.float32 else 2e-2,
                                   rtol=1e-3 if dtype == torch.float32 else 2e-2, msg=name)


def test_offline_llm_score_matches_the_card_and_the_server(server: BackgroundServer, reranker_dir: Path) -> None:
    """vLLM's offline LLM.score: the same pairs, prompts and scores as POST /score and the card's recipe."""
    from qwenstack.errors import RequestError
    from qwenstack.llm import LLM

    llm = LLM(reranker_dir, dtype="float32", device="cpu", kv_cache_memory=2**22)
    outputs = llm.score(QUERY, DOCS)
    want, lengths = hf_rerank(reranker_dir, QUERY, DOCS)
    assert [o.outputs.score for o in outputs] == pytest.approx(want, abs=1e-5)
    assert [len(o.prompt_token_ids) for o in outputs] == lengths
    served = httpx.post(server.url + "/score", json={"model": RR, "text_1": QUERY, "text_2": DOCS}).json()
    assert [o.outputs.score for o in outputs] == pytest.approx([d["score"] for d in served["data"]], abs=1e-6)
    one_to_one = llm.score([QUERY, "a fox"], DOCS[:2], instruction="Find animals")
    assert [o.outputs.score for o in one_to_one] == pytest.approx(
        [hf_rerank(reranker_dir, q, [d], "Find animals")[0][0] for q, d in zip([QUERY, "a fox"], DOCS[:2])], abs=1e-5)
    with pytest.raises(RequestError, match="2 queries and 3 documents"):
        llm.score([QUERY, QUERY], DOCS[:3])
    with pytest.raises(RequestError, match="maximum context length"):
        llm.score(QUERY, "word " * 5000)
