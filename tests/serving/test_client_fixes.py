"""What third-party clients tripped on (issue 24, item 5), each driven the way that client drives the server:

- stop strings act on the answer, not the thinking (lm-eval's `local-chat-completions` sends `stop: ["\\n"]`
  with thinking on; it used to get an empty answer for every question);
- a checkpoint whose generation_config.json says `do_sample: false` decodes greedily by default;
- GET /tokenizer_info and /tokenize, /detokenize without `model` (lm-eval's remote tokenizer);
- structured output with compact whitespace: the bundled demo model (Shakespeare, not an assistant) used to
  write newlines until max_tokens inside a json_schema answer; now it completes one in 9 of 10 seeds.
"""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from scripted import build_scripted_checkpoint
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.engine.detokenizer import IncrementalDetokenizer
from qwenstack.engine.params import ReasoningMarkers, SamplingParams
from qwenstack.generation_config import generation_defaults
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

# Newlines inside the thinking, after it, and inside the answer: a "\n" stop must cut only the last.
SCRIPT = "<think>\nFirst, recall the capital.\nThen answer in one line.\n</think>\n\nParis.\nThat is all."
REASONING = "First, recall the capital.\nThen answer in one line."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class CharDecoder:
    """Token i is the character chr(i): enough to drive the detokenizer one character at a time."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def run_detokenizer(text: str, stop: list[str], reasoning: ReasoningMarkers | None) -> tuple[str, str]:
    """(final text, concatenated stream) after feeding `text` one character per token."""
    detok = IncrementalDetokenizer(CharDecoder(), [], stop=stop, reasoning=reasoning)
    stream = ""
    for ch in text:
        detok.add_token(ord(ch))
        stream += detok.take_delta()
        if detok.stopped_on is not None:
            break
    stream += detok.take_delta(final=True)
    return detok.text, stream


@pytest.mark.parametrize("opened", [False, True])
def test_detokenizer_looks_for_stops_only_in_the_answer(opened: bool) -> None:
    text = SCRIPT.removeprefix("<think>") if opened else SCRIPT
    markers = ReasoningMarkers("<think>", "</think>", opened=opened)
    final, stream = run_detokenizer(text, ["\n"], markers)
    assert final == stream == text[: text.index("Paris.") + len("Paris.")]
    # Without the markers (thinking off, or /v1/completions) the first newline still stops it.
    final, stream = run_detokenizer(text, ["\n"], None)
    assert final == stream == text[: text.index("\n")]
    # A block that may open but does not: the stop applies from the first character.
    final, stream = run_detokenizer("Paris.\nMore", ["\n"], ReasoningMarkers("<think>", "</think>"))
    assert final == stream == "Paris."
    # Stop strings inside the thinking are not stops, the same string in the answer is.
    final, _ = run_detokenizer("<think>\nsay STOP\n</think>\n\nA STOP B", ["STOP"], markers if not opened else None)
    assert final == ("<think>\nsay STOP\n</think>\n\nA " if not opened else "<think>\nsay ")


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_checkpoint(tmp_path_factory.mktemp("lines"), SCRIPT).path


@pytest.fixture(scope="module")
def server(scripted_dir: Path) -> Iterator[BackgroundServer]:
    app = create_app([tiny_served_model(scripted_dir, "scripted")], ServerConfig(enable_ui=False))
    with BackgroundServer(app) as srv:
        yield srv


def test_stop_newline_with_thinking_returns_the_answer(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="scripted", messages=QUESTION, temperature=0, max_tokens=80,
                                       stop=["\n"])
    message = r.choices[0].message.model_dump()
    assert message["content"] == "Paris." and r.choices[0].finish_reason == "stop"
    assert message["reasoning_content"] == REASONING
    chunks = list(client.chat.completions.create(model="scripted", messages=QUESTION, temperature=0, max_tokens=80,
                                                 stop=["\n"], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert streamed == "Paris." and reasoning == REASONING
    # Thinking off: the answer comes first, so the newline stops it as before.
    r = client.chat.completions.create(model="scripted", messages=QUESTION, temperature=0, max_tokens=80,
                                       stop=["\n"], extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == "Paris."


def test_lm_eval_local_chat_completions_gets_the_answer(server: BackgroundServer) -> None:
    """lm-eval's own API class (no dataset: the request it builds for a generate_until task with until=["\\n"])."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalChatCompletion
    from lm_eval.models.api_models import JsonChatStr

    lm = LocalChatCompletion(base_url=server.url + "/v1/chat/completions", model="scripted",
                             tokenizer_backend=None, tokenized_requests=False, max_gen_toks=80)
    request = Instance("generate_until", doc={}, idx=0,
                       arguments=(JsonChatStr(json.dumps(QUESTION)), {"until": ["\n"], "do_sample": False}))
    assert lm.generate_until([request], disable_tqdm=True) == ["Paris."]


def test_lm_eval_remote_tokenizer(server: BackgroundServer, scripted_dir: Path) -> None:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from qwenstack.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(scripted_dir)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == tok.chat_template
    assert info["added_tokens_decoder"][str(tok.token_to_id("<think>"))]["content"] == "<think>"
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="scripted", tokenizer_backend="auto")
    assert lm.tokenizer_backend == "remote"
    text = "Hello Paris, 你好"
    assert lm.tok_encode(text) == tok.encode(text)
    assert lm.decode_batch([tok.encode(text)]) == [text]
    assert lm.eot_token_id == tok.token_to_id("<|im_end|>")


def test_tokenize_without_model_needs_a_single_model(scripted_dir: Path) -> None:
    models = [tiny_served_model(scripted_dir, "a"), tiny_served_model(scripted_dir, "b")]
    with BackgroundServer(create_app(models, ServerConfig(enable_ui=False))) as srv:
        r = httpx.post(srv.url + "/tokenize", json={"prompt": "hi"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "hi", "model": "b"}).status_code == 200
        assert httpx.get(srv.url + "/tokenizer_info", params={"model": "a"}).status_code == 200
        assert httpx.get(srv.url + "/tokenizer_info").status_code == 400


def test_do_sample_false_decodes_greedily(tiny_qwen3: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "greedy"
    shutil.copytree(tiny_qwen3, model_dir)
    config: dict[str, Any] = {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "eos_token_id": 1}
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    assert generation_defaults(model_dir) == {"temperature": 0.0, "top_p": 0.8}
    sampling_dir = tmp_path / "sampling"
    sampling_dir.mkdir()
    (sampling_dir / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}))
    assert generation_defaults(sampling_dir) == {"temperature": 0.7, "top_p": 0.8}
    with BackgroundServer(create_app([tiny_served_model(model_dir)], ServerConfig(enable_ui=False))) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        kwargs: dict[str, Any] = {"model": "tiny", "prompt": "The", "max_tokens": 12}
        greedy = c.completions.create(temperature=0, **kwargs).choices[0].text
        # No temperature: greedy whatever the seed (a random tiny model samples differently per seed).
        assert [c.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)] == [greedy] * 3
        sampled = {c.completions.create(seed=s, temperature=1.0, **kwargs).choices[0].text for s in (1, 2, 3)}
        assert len(sampled) > 1

    from qwenstack.llm import LLM

    llm = LLM(model_dir, device="cpu", kv_cache_memory=2**22)
    assert llm.default_sampling_params.greedy
    first = llm.generate("The")[0].outputs[0].token_ids
    assert first == llm.generate("The", SamplingParams(temperature=0))[0].outputs[0].token_ids


PERSON = {"type": "object", "required": ["name", "age", "mood"], "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "mood": {"enum": ["merry", "sad", "angry"]}}}


def test_demo_model_completes_a_json_schema_answer() -> None:
    import jsonschema

    from qwenstack.llm import DEMO_MODEL_DIR

    served = tiny_served_model(DEMO_MODEL_DIR, "demo")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]

    async def ask_all(url: str) -> list[Any]:
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(c.chat.completions.create(  # thinking on, the model's own sampling
            model="demo", messages=messages, response_format=fmt, max_tokens=200, seed=seed) for seed in range(10)))

    with BackgroundServer(create_app([served], ServerConfig(enable_ui=False))) as srv:
        replies = asyncio.run(ask_all(srv.url))
    valid = 0
    for r in replies:
        try:
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        except (ValueError, TypeError, jsonschema.ValidationError):
            continue
        valid += r.choices[0].finish_reason == "stop"
    assert valid >= 9, [r.choices[0].message.content for r in replies]


# A model that writes pretty-printed JSON (as small models like to): newlines and indentation.
PRETTY = '{\n  "city": "Paris",\n  "sunny": true\n}'
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"]}


@pytest.fixture(scope="module")
def pretty_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    ckpt = build_scripted_checkpoint(tmp_path_factory.mktemp("pretty"), "<think>\nJSON.\n</think>\n\n" + PRETTY)
    app = create_app([tiny_served_model(ckpt.path, "pretty")], ServerConfig(enable_ui=False))
    with BackgroundServer(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}],
    ids=["json_object", "json_schema"])
def test_json_whitespace_is_compact_unless_the_request_relaxes_it(pretty_client: openai.OpenAI,
                                                                  response_format: dict) -> None:
    def answer(**extra: Any) -> Any:
        return pretty_client.chat.completions.create(
            model="pretty", messages=QUESTION, temperature=0, max_tokens=40, response_format=response_format,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}, **extra}).choices[0]

    free = pretty_client.chat.completions.create(model="pretty", messages=QUESTION, temperature=0, max_tokens=40,
                                                 extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert free.choices[0].message.content == PRETTY  # what the model writes unconstrained
    compact = answer()
    # By default the grammar holds whitespace to json.dumps' separators: the model's newlines and
    # indentation are masked, whatever it writes instead.
    assert "\n" not in compact.message.content and "  " not in compact.message.content, compact.message.content
    # vLLM's guided_whitespace_pattern relaxes it: the model's own pretty JSON passes through.
    relaxed = answer(guided_whitespace_pattern="[ \\n]*")
    assert relaxed.message.content == PRETTY and relaxed.finish_reason == "stop"
    assert json.loads(relaxed.message.content) == {"city": "Paris", "sunny": True}

