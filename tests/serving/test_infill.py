"""Fill-in-the-middle for Coder models on the three routes editors use: /v1/completions `suffix`, Ollama's
/api/generate `suffix` and llama.cpp's /infill (with the repository's other files). A tiny random Qwen3 whose
tokenizer has Qwen's FIM and repository markers: the prompt is checked token for token, and the answer against
transformers' greedy continuation of that prompt, cut where the middle ends."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from checkpoints import TINY_VOCAB, build_hf_checkpoint, dense_config, hf_greedy, load_hf
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.llm import DEMO_MODEL_DIR
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.tokenizer import Tokenizer

MARKERS = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def coder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    path = build_hf_checkpoint(tmp_path_factory.mktemp("coder"), "qwen3", dense_config(vocab_size=TINY_VOCAB + 8),
                               seed=3)
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKERS])  # as Qwen's are
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def server(coder_dir: Path) -> Iterator[BackgroundServer]:
    models = [tiny_served_model(coder_dir, "coder"), tiny_served_model(DEMO_MODEL_DIR, "demo")]
    with BackgroundServer(create_app(models, ServerConfig(enable_ui=False))) as srv:
        yield srv


def marker(tok: Tokenizer, text: str) -> int:
    token = tok.token_to_id(text)
    assert token is not None
    return token


def psm_ids(tok: Tokenizer, prefix: str, suffix: str) -> list[int]:
    return ([marker(tok, "<|fim_prefix|>")] + tok.encode(prefix) + [marker(tok, "<|fim_suffix|>")] + tok.encode(suffix)
            + [marker(tok, "<|fim_middle|>")])


def reference_middle(coder_dir: Path, ids: list[int], tok: Tokenizer, new_tokens: int) -> list[int]:
    """transformers' greedy tokens after the prompt, up to the first end of the middle (a marker or eos)."""
    stops = {marker(tok, m) for m in MARKERS} | {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")}
    out = hf_greedy(load_hf(coder_dir), [ids], new_tokens)[0]
    return next((out[:i] for i, t in enumerate(out) if t in stops), out)


def test_completions_suffix_is_the_prefix_suffix_middle_prompt(client: openai.OpenAI, coder_dir: Path) -> None:
    tok = Tokenizer.from_dir(coder_dir)
    ids = psm_ids(tok, PREFIX, SUFFIX)
    reply = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True})
    choice = reply.model_dump()["choices"][0]
    assert choice["prompt_token_ids"] == ids and reply.usage.prompt_tokens == len(ids)
    middle = reference_middle(coder_dir, ids, tok, 24)
    assert len(middle) > 3 and choice["token_ids"] == middle
    assert not any(m in choice["text"] for m in MARKERS)
    streamed = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice["text"]


def test_ollama_generate_suffix_matches(server: BackgroundServer, client: openai.OpenAI, coder_dir: Path) -> None:
    tok = Tokenizer.from_dir(coder_dir)
    want = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0)
    got = httpx.post(server.url + "/api/generate", timeout=60, json={
        "model": "coder", "prompt": PREFIX, "suffix": SUFFIX, "stream": False,
        "system": "left out, as Ollama's Coder templates leave it", "options": {"temperature": 0, "num_predict": 24}})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["response"] == want.choices[0].text and body["prompt_eval_count"] == len(psm_ids(tok, PREFIX, SUFFIX))


def test_llamacpp_infill_puts_the_repository_first(server: BackgroundServer, coder_dir: Path) -> None:
    tok = Tokenizer.from_dir(coder_dir)
    files = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b"}]
    repo = ([marker(tok, "<|repo_name|>")] + tok.encode("repo\n") + [marker(tok, "<|file_sep|>")]
            + tok.encode("util.py\ndef sub(a, b):\n    return a - b\n"))
    ids = repo + psm_ids(tok, PREFIX, SUFFIX) + tok.encode("return")
    got = httpx.post(server.url + "/infill", timeout=60, json={
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": files, "prompt": "return", "model": "coder",
        "n_predict": 20, "temperature": 0})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["tokens_evaluated"] == len(ids)
    middle = reference_middle(coder_dir, ids, tok, 20)
    assert len(middle) > 3 and body["content"] == tok.decode(middle)
    lines = httpx.post(server.url + "/infill", timeout=60, json={
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": files, "prompt": "return", "model": "coder",
        "n_predict": 20, "temperature": 0, "stream": True}).text
    assert '"stop": true' in lines and '"content"' in lines


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX}, "suffix"),
    ("/api/generate", {"prompt": PREFIX, "suffix": SUFFIX, "stream": False}, None),
    ("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX}, "input_suffix"),
])
def test_a_model_without_fim_tokens_says_it_cannot_insert(server: BackgroundServer, route: str, body: dict,
                                                          param: str | None) -> None:
    reply = httpx.post(server.url + route, json={"model": "demo", **body}, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    message = error if isinstance(error, str) else error["message"]  # Ollama's errors are one string
    assert "does not support insert" in message
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("extra, param", [
    ({"echo": True}, "echo"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
])
def test_suffix_refuses_what_it_cannot_combine_with(server: BackgroundServer, extra: dict, param: str) -> None:
    reply = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "coder", "prompt": PREFIX, "suffix": SUFFIX, **extra})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
