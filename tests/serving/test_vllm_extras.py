"""vLLM's request extras that RL and evaluation frameworks send through the `openai` SDK's extra_body:
prompt_logprobs (checked against transformers' own log-softmax of the demo model), return_token_ids (streamed and
not), allowed_token_ids, bad_words and truncate_prompt_tokens, on /v1/chat/completions and /v1/completions; and
lm-evaluation-harness's scoring request (echo with logprobs), whose scores are checked against the same reference."""
from __future__ import annotations

import functools
import json
from typing import Any, Iterator

import httpx
import openai
import pytest
import torch

from server_utils import BackgroundServer, tiny_served_model
from qwenstack.llm import DEMO_MODEL_DIR
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.tokenizer import Tokenizer

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    app = create_app([tiny_served_model(DEMO_MODEL_DIR, "demo")], ServerConfig(enable_ui=False))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DEMO_MODEL_DIR)


@functools.cache
def reference_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()


def reference_log_probs(ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the demo model's logits at each prompt position [T, V] (float32)."""
    with torch.no_grad():
        logits = reference_model()(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)


def check_against_reference(prompt_logprobs: list[Any], ids: list[int], top: int) -> None:
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    reference = reference_log_probs(ids)
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        row = reference[position - 1]  # the logits before a token predict it
        token = ids[position]
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(row[token].item(), abs=2e-3)
        assert own["rank"] == int((row > row[token]).sum()) + 1
        best = torch.topk(row, top).indices.tolist()
        listed = {int(t) for t in entry}
        assert set(best) <= listed and listed <= set(best) | {token}, (position, entry)
        for t in best:
            assert entry[str(t)]["rank"] <= top and entry[str(t)]["decoded_token"] is not None


def test_completions_prompt_logprobs_match_transformers(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    reply = client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"prompt_logprobs": 3})
    choice = reply.model_dump()["choices"][0]
    check_against_reference(choice["prompt_logprobs"], tokenizer.encode(PROMPT), 3)


def harness_scores(choices: list[dict[str, Any]], ctxlens: list[int], generated: int) -> list[tuple[float, bool]]:
    """What lm-evaluation-harness (0.4.x, LocalCompletionsAPI.parse_logprobs) makes of a reply: the choices in index
    order, each continuation's summed logprob past its context, and whether every token was the most likely one
    (its logprob is the largest of top_logprobs); the `generated` tokens after the prompt are left out."""
    scores = []
    for choice, ctxlen in zip(sorted(choices, key=lambda c: c["index"]), ctxlens):
        end = len(choice["logprobs"]["token_logprobs"]) - generated
        lps, tops = (choice["logprobs"][k][ctxlen:end] for k in ("token_logprobs", "top_logprobs"))
        scores.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return scores


def reference_scores(ids: list[int], ctxlen: int) -> tuple[float, bool]:
    rows = reference_log_probs(ids)
    picked = [(rows[p - 1], ids[p]) for p in range(ctxlen, len(ids))]
    return sum(row[t].item() for row, t in picked), all(int(row.argmax()) == t for row, t in picked)


def test_lm_eval_loglikelihood_requests_score_as_transformers(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    """The body lm-eval's local-completions sends for loglikelihood tasks with --batch_size 3 (token-id prompts,
    echo, logprobs 1, max_tokens 1, seed), and max_tokens 0 (older harnesses, OpenAI's legacy scoring): each
    continuation's score and greediness equal transformers' float32 ones, and the choices come in prompt order."""
    context = tokenizer.encode("ROMEO: But soft, what light")
    greedy = list(context)
    for _ in range(4):  # the model's own continuation: greedy by construction
        greedy.append(int(reference_log_probs(greedy)[-1].argmax()))
    rolling = [tokenizer.token_to_id("<|im_end|>")] + tokenizer.encode("JULIET: O Romeo! wherefore — café")
    prompts = [context + tokenizer.encode(" through yonder window breaks?"), rolling, greedy]
    ctxlens = [len(context), 1, len(context)]  # a loglikelihood_rolling window scores all but its prefix token
    expected = [reference_scores(ids, n) for ids, n in zip(prompts, ctxlens)]
    assert [g for _, g in expected] == [False, False, True]
    for max_tokens in (1, 0):
        reply = client.completions.create(model="demo", prompt=prompts, temperature=0, max_tokens=max_tokens,
                                          logprobs=1, seed=1234, echo=True).model_dump()
        assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
        assert [len(c["logprobs"]["tokens"]) for c in reply["choices"]] == [len(p) + max_tokens for p in prompts]
        got = harness_scores(reply["choices"], ctxlens, max_tokens)
        assert [g for _, g in got] == [g for _, g in expected]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-3)


def test_chat_prompt_logprobs_are_the_rendered_prompts(client: openai.OpenAI) -> None:
    """Chat answers them at the top level, over the rendered prompt (return_token_ids gives its ids); `true` is
    vLLM's lax spelling of 1; n=2 shares the one prompt."""
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Speak, friend."}],
                                           max_tokens=3, n=2, seed=4,
                                           extra_body={**NO_THINKING, "prompt_logprobs": True,
                                                       "return_token_ids": True})
    body = reply.model_dump()
    check_against_reference(body["prompt_logprobs"], body["prompt_token_ids"], 1)
    assert body["usage"]["prompt_tokens"] == len(body["prompt_token_ids"])


def test_token_ids_are_what_was_generated(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    reply = client.completions.create(model="demo", prompt=[PROMPT, "JULIET:"], max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True}).model_dump()
    for choice, prompt in zip(reply["choices"], [PROMPT, "JULIET:"]):
        assert choice["prompt_token_ids"] == tokenizer.encode(prompt)
        assert tokenizer.decode(choice["token_ids"]) == choice["text"] and len(choice["token_ids"]) == 12
    assert reply["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_streamed_token_ids_join_to_the_whole_answers(client: openai.OpenAI, route: str) -> None:
    """Each chunk carries its new ids (vLLM's streamed token_ids), the first the prompt's, and they join to what a
    request that is not streamed gets; no chunk of tokens is dropped, even one whose text the parser holds back."""
    extra = {"return_token_ids": True, "ignore_eos": True, **(NO_THINKING if route == "chat" else {})}
    if route == "chat":
        messages = [{"role": "user", "content": "Tell me of Verona."}]
        call = lambda **kw: client.chat.completions.create(model="demo", messages=messages, max_tokens=20,  # noqa: E731
                                                           temperature=0, extra_body=extra, **kw)
    else:
        call = lambda **kw: client.completions.create(model="demo", prompt=PROMPT, max_tokens=20,  # noqa: E731
                                                      temperature=0, extra_body=extra, **kw)
    whole = call().model_dump()
    chunks = [c.model_dump() for c in call(stream=True)]
    streamed = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids") or []]
    assert streamed == whole["choices"][0]["token_ids"] and len(streamed) == 20
    first_prompt_ids = next(c.get("prompt_token_ids") or c["choices"][0].get("prompt_token_ids") for c in chunks)
    expected = whole["prompt_token_ids"] if route == "chat" else whole["choices"][0]["prompt_token_ids"]
    assert first_prompt_ids == expected


def test_allowed_token_ids_bound_every_sample(client: openai.OpenAI) -> None:
    allowed = [14, 16, 340, 364, 737]
    for route in ("chat", "completions"):
        extra = {"allowed_token_ids": allowed, "return_token_ids": True}
        if route == "chat":
            reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hm?"}],
                                                   max_tokens=16, n=3, seed=9, extra_body=extra).model_dump()
        else:
            reply = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=16, n=3, seed=9,
                                              extra_body=extra).model_dump()
        ids = [c["token_ids"] for c in reply["choices"]]
        assert all(len(row) == 16 and set(row) <= set(allowed) for row in ids), ids
        assert len({tuple(row) for row in ids}) > 1  # sampled, not collapsed onto one token


def test_bad_words_are_never_written(client: openai.OpenAI) -> None:
    """The greedy answer's words are banned one by one: each is gone from the new answer, one-token and longer."""
    free = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    words = [w.strip(",.;:!?'") for w in free.split()]
    words = [w for w in words if len(w) > 2][:3]
    assert words, free
    banned = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0,
                                       extra_body={"bad_words": words}).choices[0].text
    assert banned != free
    for word in words:
        assert f" {word}" not in banned and not banned.startswith(word), (word, banned)


def test_truncate_prompt_tokens_keeps_the_last_tokens(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    long_text = "ROMEO: " + "O, speak again, bright angel! " * 400  # far past the demo model's 512 tokens
    reply = client.completions.create(model="demo", prompt=long_text, max_tokens=4, temperature=0,
                                      extra_body={"truncate_prompt_tokens": 30, "return_token_ids": True})
    choice = reply.model_dump()["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode(long_text)[-30:]
    assert reply.usage.prompt_tokens == 30
    ids = list(range(100, 160)) * 20
    reply = client.completions.create(model="demo", prompt=ids, max_tokens=4,
                                      extra_body={"truncate_prompt_tokens": 25, "return_token_ids": True})
    assert reply.model_dump()["choices"][0]["prompt_token_ids"] == ids[-25:]
    with pytest.raises(openai.BadRequestError) as info:  # without it, the same prompt is refused
        client.completions.create(model="demo", prompt=long_text, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, param, message", [
    ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs", "not available when stream"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "less than or equal to 20"),
    ({"allowed_token_ids": [5, 10**7]}, "allowed_token_ids", "outside the vocabulary"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "at least 1 item"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1 or at least 1"),
    ({"truncate_prompt_tokens": 100000}, "truncate_prompt_tokens", "more than the 511 prompt tokens"),
])
def test_bad_extras_are_400s_that_name_the_field(server: BackgroundServer, body: dict, param: str,
                                                  message: str) -> None:
    routes = ["/v1/completions"] + ([] if "truncate_prompt_tokens" in body else ["/v1/chat/completions"])
    for route in routes:
        base = {"prompt": "ROMEO:"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
        reply = httpx.post(server.url + route, json={"model": "demo", "max_tokens": 3, **base, **body}, timeout=60)
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == param and message in error["message"], (route, error)


def test_fields_left_out_change_nothing(server: BackgroundServer) -> None:
    reply = httpx.post(server.url + "/v1/completions", json={"model": "demo", "prompt": "ROMEO:", "max_tokens": 3},
                       timeout=60).json()
    choice = reply["choices"][0]
    assert choice["prompt_logprobs"] is None and choice["token_ids"] is None and choice["prompt_token_ids"] is None
    assert json.dumps(reply)  # still plain JSON


def test_constraints_that_leave_no_token_are_a_400(client: openai.OpenAI) -> None:
    """allowed_token_ids that the grammar never allows: the request's own error, said as a 400 (an error event
    once streamed), where a draw from no mass had been a 500; the server answers the next request as before."""
    extra = {"allowed_token_ids": [11, 12], "guided_choice": ["Verona", "Mantua"]}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt="ROMEO:", max_tokens=5, extra_body=extra)
    assert "no token can be generated" in info.value.body["message"]
    with pytest.raises(openai.APIError) as streamed:
        list(client.completions.create(model="demo", prompt="ROMEO:", max_tokens=5, stream=True, extra_body=extra))
    assert "no token can be generated" in str(streamed.value)
    assert client.completions.create(model="demo", prompt="ROMEO:", max_tokens=3).choices[0].text
