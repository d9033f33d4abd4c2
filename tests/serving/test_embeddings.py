"""POST /v1/embeddings through the official `openai` SDK against a real uvicorn on loopback, serving a tiny random
Qwen3-Embedding (the released layout: Qwen3Model's tensors, sentence-transformers files, a tokenizer that
appends <|endoftext|>) beside a tiny chat model: transformers parity, float and base64, dimensions, the four
input forms, prompt_name, refusals in OpenAI's error shape, chat refused on the embedding model, and embeddings
from the chat model while it generates."""
from __future__ import annotations

import asyncio
import base64
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
import torch

from embedding_checkpoints import QUERY_PROMPT, build_embedding_checkpoint, hf_embeddings
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.tokenizer import Tokenizer

EMB, CHAT = "qwen3-embedding", "tiny"
TEXTS = ["Paris is the capital of France.", "The quick brown fox", "2 + 2 = 4"]
CONTEXT = 128  # the embedding model's max_model_len here (the "query" prompt alone is 70 tokens)
HIDDEN = 64  # dense_config's hidden_size


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedding_checkpoint(tmp_path_factory.mktemp("qwen3-embedding"), seed=7)


@pytest.fixture(scope="module")
def server(embedding_dir: Path, tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    models = [tiny_served_model(embedding_dir, EMB, max_model_len=CONTEXT), tiny_served_model(tiny_qwen3, CHAT)]
    with BackgroundServer(create_app(models, ServerConfig(ui_db_path=":memory:"))) as srv:
        yield srv


def embedding_ids(model_dir: Path, text: str) -> list[int]:
    """The ids the reference embeds: the tokenizer's post-processor has appended <|endoftext|>."""
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(text, add_special_tokens=True)
    assert ids[-1] == tok.token_to_id("<|endoftext|>")
    return ids


def vectors(response: Any) -> torch.Tensor:
    """The response's vectors in input order; base64 ones (the SDK decodes only those it asked for) decoded."""
    rows = []
    for d in sorted(response.data, key=lambda d: d.index):
        if isinstance(d.embedding, str):
            raw = base64.b64decode(d.embedding)
            rows.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
        else:
            rows.append(d.embedding)
    return torch.tensor(rows)


def test_embeddings_match_transformers(client: openai.OpenAI, embedding_dir: Path) -> None:
    response = client.embeddings.create(model=EMB, input=TEXTS, encoding_format="float")
    assert response.object == "list" and response.model == EMB
    assert [d.index for d in response.data] == [0, 1, 2] and all(d.object == "embedding" for d in response.data)
    prompts = [embedding_ids(embedding_dir, t) for t in TEXTS]
    torch.testing.assert_close(vectors(response), hf_embeddings(embedding_dir, prompts), atol=1e-4, rtol=0)
    tokens = sum(map(len, prompts))
    assert response.usage.prompt_tokens == tokens and response.usage.total_tokens == tokens


def test_base64_is_little_endian_float32(client: openai.OpenAI, server: BackgroundServer) -> None:
    as_floats = vectors(client.embeddings.create(model=EMB, input=TEXTS, encoding_format="float"))
    # The SDK asks for base64 when no format is given and decodes it itself.
    torch.testing.assert_close(vectors(client.embeddings.create(model=EMB, input=TEXTS)), as_floats)
    raw = httpx.post(server.url + "/v1/embeddings",
                     json={"model": EMB, "input": TEXTS[0], "encoding_format": "base64"}).json()
    data = base64.b64decode(raw["data"][0]["embedding"])
    assert len(data) == 4 * HIDDEN
    assert list(struct.unpack(f"<{HIDDEN}f", data)) == as_floats[0].tolist()


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_dimensions_truncate_then_renormalize(client: openai.OpenAI, encoding_format: str) -> None:
    full = vectors(client.embeddings.create(model=EMB, input=TEXTS, encoding_format="float"))
    short = vectors(client.embeddings.create(model=EMB, input=TEXTS, dimensions=16,
                                             encoding_format=encoding_format))  # type: ignore[arg-type]
    assert short.shape == (3, 16)
    torch.testing.assert_close(short, torch.nn.functional.normalize(full[:, :16], dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(short.norm(dim=-1), torch.ones(3))
    assert vectors(client.embeddings.create(model=EMB, input="x", dimensions=HIDDEN)).shape == (1, HIDDEN)


def test_token_id_inputs_are_embedded_as_given(client: openai.OpenAI, embedding_dir: Path) -> None:
    from_text = vectors(client.embeddings.create(model=EMB, input=TEXTS[:2], encoding_format="float"))
    ids = [embedding_ids(embedding_dir, t) for t in TEXTS[:2]]
    one = client.embeddings.create(model=EMB, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=EMB, input=ids, encoding_format="float")
    torch.testing.assert_close(vectors(one)[0], from_text[0])
    torch.testing.assert_close(vectors(many), from_text)
    assert many.usage.prompt_tokens == sum(map(len, ids))


def test_truncate_prompt_tokens_embeds_each_inputs_last_tokens(client: openai.OpenAI, embedding_dir: Path) -> None:
    """vLLM's truncate_prompt_tokens: a text past the context is cut to its last k tokens (the end token among them)
    instead of refused, and token-id inputs the same way."""
    long_text = "Paris is the capital of France. " * 60  # several times the 128-token context
    full = embedding_ids(embedding_dir, long_text)
    assert len(full) > CONTEXT
    got = client.embeddings.create(model=EMB, input=[long_text, TEXTS[2]], encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": 20})
    short = embedding_ids(embedding_dir, TEXTS[2])
    want = hf_embeddings(embedding_dir, [full[-20:], short[-20:]])
    torch.testing.assert_close(vectors(got), want, atol=1e-4, rtol=0)
    assert got.usage.prompt_tokens == 20 + min(20, len(short))
    ids = client.embeddings.create(model=EMB, input=full, encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": -1})
    torch.testing.assert_close(vectors(ids), hf_embeddings(embedding_dir, [full[-CONTEXT:]]), atol=1e-4, rtol=0)
    with pytest.raises(openai.BadRequestError):  # not cut without it
        client.embeddings.create(model=EMB, input=long_text)


def test_prompt_name_puts_the_checkpoints_instruction_first(client: openai.OpenAI, embedding_dir: Path) -> None:
    query = "capital of France"
    got = vectors(client.embeddings.create(model=EMB, input=query, encoding_format="float",
                                           extra_body={"prompt_name": "query"}))
    want = hf_embeddings(embedding_dir, [embedding_ids(embedding_dir, QUERY_PROMPT + query)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_chat_model_answers_embeddings(client: openai.OpenAI, tiny_qwen3: Path) -> None:
    """Ollama's way: the final hidden state at the last token, normalized; nothing appended."""
    import transformers

    response = client.embeddings.create(model=CHAT, input=TEXTS, encoding_format="float")
    tok = Tokenizer.from_dir(tiny_qwen3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = torch.stack([ref.model(torch.tensor([tok.encode(t, add_special_tokens=True)])).last_hidden_state[0, -1]
                            for t in TEXTS])
    torch.testing.assert_close(vectors(response), torch.nn.functional.normalize(want, dim=-1), atol=1e-4, rtol=0)


def test_embeddings_while_the_chat_model_generates(server: BackgroundServer, client: openai.OpenAI) -> None:
    """Embedding passes run in the engine thread between steps: neither side sees the other's work."""
    alone = vectors(client.embeddings.create(model=CHAT, input=TEXTS, encoding_format="float"))
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def generate() -> list[str]:
        answers = await asyncio.gather(*(aclient.completions.create(
            model=CHAT, prompt=f"Once upon a time {i}", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
            for i in range(4)))
        return [a.choices[0].finish_reason for a in answers]

    async def embed() -> list[torch.Tensor]:
        results = []
        for _ in range(6):
            results.append(vectors(await aclient.embeddings.create(model=CHAT, input=TEXTS, encoding_format="float")))
            await asyncio.sleep(0.01)
        return results

    async def both() -> tuple[list[str], list[torch.Tensor]]:
        try:
            return await asyncio.gather(generate(), embed())
        finally:
            await aclient.close()

    reasons, during = asyncio.run(both())
    assert reasons == ["length"] * 4
    for got in during:
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def post(server: BackgroundServer, body: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)


TOO_LONG_TEXT = " ".join(["Paris"] * (2 * CONTEXT))
BAD_BODIES: dict[str, Any] = {
    "empty string": {"input": ""},
    "empty list": {"input": []},
    "empty string in list": {"input": ["hello", ""]},
    "empty token list": {"input": [[1, 2], []]},
    "float tokens": {"input": [1, 2.5]},
    "string tokens": {"input": [[1, "2"]]},
    "bool tokens": {"input": [True, False]},
    "mixed list": {"input": ["hello", 3]},
    "number input": {"input": 5},
    "object input": {"input": {"text": "hello"}},
    "null input": {"input": None},
    "no input": {},
    "token outside vocabulary": {"input": [1, 10**6]},
    "negative token": {"input": [[-1]]},
    "text longer than the context": {"input": ["hello", TOO_LONG_TEXT]},
    "token ids longer than the context": {"input": list(range(1, CONTEXT + 2))},
    "too many inputs": {"input": ["a"] * 2049},
    "encoding format": {"input": "hello", "encoding_format": "hex"},
    "zero dimensions": {"input": "hello", "dimensions": 0},
    "dimensions above the hidden size": {"input": "hello", "dimensions": HIDDEN + 1},
    "dimensions as a string": {"input": "hello", "dimensions": "16"},
    "unknown prompt_name": {"input": "hello", "prompt_name": "passage"},
    "prompt_name with token ids": {"input": [1, 2], "prompt_name": "query"},
    "model not a string": {"input": "hello", "model": 3},
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_input_is_a_400_in_openais_shape(server: BackgroundServer, case: str) -> None:
    body = {"model": EMB, **BAD_BODIES[case]}
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if "context" in case:
        assert error["code"] == "context_length_exceeded" and str(CONTEXT) in error["message"]


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="nope", input="hello")


def test_an_embedding_model_refuses_chat_and_completions(client: openai.OpenAI, server: BackgroundServer) -> None:
    with pytest.raises(openai.BadRequestError, match="embedding model") as chat:
        client.chat.completions.create(model=EMB, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model=EMB, prompt="hi")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.responses.create(model=EMB, input="hi")
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards[EMB]["capabilities"] == ["embedding"] and cards[EMB]["max_model_len"] == CONTEXT
    assert "embedding" not in cards[CHAT]["capabilities"] or "chat" in cards[CHAT]["capabilities"]


def test_the_bundled_demo_model_answers_a_rag_client() -> None:
    """What `qwenstack serve` with no model serves: a chat model, so Ollama-style embeddings."""
    from qwenstack.loading import DEMO_MODEL_DIR

    demo = tiny_served_model(DEMO_MODEL_DIR, "demo")
    with BackgroundServer(create_app([demo], ServerConfig(ui_db_path=":memory:"))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        response = client.embeddings.create(model="demo", input=["To be, or not to be", "Friends, Romans"])
    got = vectors(response)
    assert got.shape == (2, demo.engine.engine.model.args.hidden_size)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(got[0], got[1])


def test_serving_an_embedding_checkpoint_by_path(embedding_dir: Path) -> None:
    """`qwenstack serve ./Qwen3-Embedding-0.6B`'s path: loaded in the background like any model (bfloat16 by
    default), detected as an embedding model, its KV pool the smallest one."""
    from qwenstack.serving.config import ModelSpec

    config = ServerConfig(ui_db_path=":memory:", models=[ModelSpec(str(embedding_dir), name=EMB)])
    with BackgroundServer(create_app([], config)) as srv:
        for _ in range(600):
            if httpx.get(srv.url + "/health").status_code == 200:
                break
            time.sleep(0.05)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        got = vectors(client.embeddings.create(model=EMB, input=TEXTS))
        ps = httpx.get(srv.url + "/api/ps").json()["models"][0]
    want = hf_embeddings(embedding_dir, [embedding_ids(embedding_dir, t) for t in TEXTS])
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # bfloat16 weights against float32
    assert ps["capabilities"] == ["embedding"] and ps["kv_blocks"] == 2
