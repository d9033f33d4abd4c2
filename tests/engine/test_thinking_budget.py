"""Thinking budget (qwenstack.engine.thinking_budget): counting, forcing "\\n</think>\\n\\n", then the answer; on fake
logits rows, on a scripted checkpoint (the answer follows the forced close) and on a random one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripted import FORCED_CLOSE, ScriptedCheckpoint, build_case
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.llm import LLM
from qwenstack.serving.parsers import parse_chat_output
from qwenstack.engine.grammar import make_json_processor
from qwenstack.engine.thinking_budget import make_thinking_budget_processor
from qwenstack.tokenizer import Tokenizer

NEG = float("-inf")


@pytest.fixture(scope="module")
def long_think(tmp_path_factory: pytest.TempPathFactory) -> ScriptedCheckpoint:
    return build_case(tmp_path_factory.mktemp("scripted") / "long_think", "long_think")


@pytest.fixture(scope="module")
def tokenizer(long_think: ScriptedCheckpoint) -> Tokenizer:
    return Tokenizer.from_dir(long_think.path)


def run(processor, tokenizer: Tokenizer, proposals: list[int], steps: int) -> list[int]:  # noqa: ANN001
    """Greedy over a fake model that always proposes `proposals[i]` (or the last one) at step i."""
    out: list[int] = []
    for i in range(steps):
        logits = torch.zeros(tokenizer.vocab_size)
        logits[proposals[min(i, len(proposals) - 1)]] = 10.0
        out.append(int(processor(out, logits).argmax()))
    return out


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def test_budget_closes_the_block_then_lets_the_answer_follow(tokenizer: Tokenizer) -> None:
    think, word, answer = ids(tokenizer, "<think>")[0], ids(tokenizer, "hmm")[0], ids(tokenizer, "ok")[0]
    forced = ids(tokenizer, FORCED_CLOSE)
    proc = make_thinking_budget_processor(tokenizer, 3, starts_in_reasoning=False)
    out = run(proc, tokenizer, [think] + [word] * 3 + [answer], 3 + 1 + len(forced) + 2)
    assert out == [think, word, word, word] + forced + [answer] * 2
    assert tokenizer.decode(out).startswith("<think>") and FORCED_CLOSE in tokenizer.decode(out)


def test_budget_zero_closes_at_once(tokenizer: Tokenizer) -> None:
    forced = ids(tokenizer, FORCED_CLOSE)
    word = ids(tokenizer, "hmm")[0]
    proc = make_thinking_budget_processor(tokenizer, 0, starts_in_reasoning=True)
    assert run(proc, tokenizer, [word], len(forced) + 1) == forced + [word]
    think = ids(tokenizer, "<think>")[0]
    proc = make_thinking_budget_processor(tokenizer, 0, starts_in_reasoning=False)
    assert run(proc, tokenizer, [word, word, think, word], 3 + len(forced)) == [word, word, think] + forced


def test_no_forcing_when_the_model_closes_in_time_or_never_thinks(tokenizer: Tokenizer) -> None:
    think, close, word = ids(tokenizer, "<think>")[0], ids(tokenizer, "</think>")[0], ids(tokenizer, "hmm")[0]
    proc = make_thinking_budget_processor(tokenizer, 3, starts_in_reasoning=False)
    assert run(proc, tokenizer, [think, word, close, word], 8) == [think, word, close] + [word] * 5
    call = ids(tokenizer, "<tool_call>")[0]  # a tool call first: a later <think> opens nothing
    proc = make_thinking_budget_processor(tokenizer, 1, starts_in_reasoning=False)
    assert run(proc, tokenizer, [call, think, word], 6) == [call, think] + [word] * 4


def test_leading_newline_dropped_when_thinking_ends_a_line(tokenizer: Tokenizer) -> None:
    line = ids(tokenizer, "\n")[0]
    proc = make_thinking_budget_processor(tokenizer, 2, starts_in_reasoning=True)
    forced = ids(tokenizer, FORCED_CLOSE.lstrip("\n"))
    assert run(proc, tokenizer, [line], 2 + len(forced)) == [line, line] + forced


def test_processor_replays_when_the_list_is_not_a_continuation(tokenizer: Tokenizer) -> None:
    word = ids(tokenizer, "hmm")[0]
    first = ids(tokenizer, FORCED_CLOSE)[0]
    proc = make_thinking_budget_processor(tokenizer, 2, starts_in_reasoning=True)
    assert int(proc([word, word], torch.zeros(tokenizer.vocab_size)).argmax()) == first
    row = proc([word], torch.zeros(tokenizer.vocab_size))  # another sequence's (shorter) output: recount
    assert not torch.isinf(row).any()


@pytest.mark.parametrize("budget", [-1, 1.5, True, "8"])
def test_invalid_budget_is_a_request_error(tokenizer: Tokenizer, budget: object) -> None:
    with pytest.raises(RequestError, match="budget"):
        make_thinking_budget_processor(tokenizer, budget, False)  # type: ignore[arg-type]


def test_tokenizer_without_think_end_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer, models

    bare = Tokenizer(RustTokenizer(models.BPE()), chat_template=None)
    with pytest.raises(RequestError, match="</think>"):
        make_thinking_budget_processor(bare, 4, False)


def test_scripted_model_answers_after_a_forced_close(long_think: ScriptedCheckpoint) -> None:
    llm = LLM(long_think.path, device="cpu", kv_cache_memory=2**22)
    tok = llm.tokenizer
    messages = [{"role": "user", "content": "Think it through."}]
    budget = 7
    prompts = [tok.apply_chat_template(messages, enable_thinking=e) for e in (True, False, True)]
    params = [SamplingParams(temperature=0, max_tokens=200,
                             logits_processors=[make_thinking_budget_processor(tok, b, False)])
              for b in (budget, budget, 10_000)]
    on, off, unlimited = (o.outputs[0] for o in llm.generate(prompts, params))
    want = long_think.script_token_ids[: 1 + budget] + tok.encode(FORCED_CLOSE) + long_think.answer_token_ids
    assert on.token_ids == want
    message = parse_chat_output(on.text)
    assert message.content == long_think.answer and message.reasoning
    assert off.text == long_think.answer  # thinking disabled: the pre-filled block is closed, nothing to force
    assert unlimited.text == long_think.script


def test_random_model_with_budget_and_json(tiny_qwen3: Path) -> None:
    # Pre-filled <think>: thinking from the first token; the budget closes it, then the grammar makes JSON.
    llm = LLM(tiny_qwen3, dtype="float32", device="cpu", kv_cache_memory=2**22)
    tok = llm.tokenizer
    budget = 5
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=60, logits_processors=[
        make_thinking_budget_processor(tok, budget, starts_in_reasoning=True),
        make_json_processor(tok, fmt, starts_in_reasoning=True)]) for seed in range(3)]
    prompt = tok.encode("<|im_start|>user\nA number?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    for out in (o.outputs[0] for o in llm.generate([prompt] * 3, params)):
        close = out.token_ids.index(tok.token_to_id("</think>"))
        assert close <= budget + 1  # the budget's tokens, the forced newline, then </think> (or earlier)
        message = parse_chat_output(out.text, starts_in_reasoning=True)
        assert out.finish_reason == "stop"
        assert 0 <= json.loads(message.content or "")["n"] <= 99
