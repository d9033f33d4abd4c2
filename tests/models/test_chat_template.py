"""Our jinja rendering equals transformers' apply_chat_template on the same tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest

from qwenstack.tokenizer import Tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

CONVERSATIONS = {
    "plain": dict(messages=[{"role": "user", "content": "Hello there"}]),
    "system": dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    "multi-turn-drops-earlier-thinking": dict(messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
        {"role": "user", "content": "thanks"}]),
    "thinking-off": dict(messages=[{"role": "user", "content": "Hi"}], enable_thinking=False),
    "thinking-on": dict(messages=[{"role": "user", "content": "Hi"}], enable_thinking=True),
    "tools-offered": dict(messages=[{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather?"}],
                          tools=[WEATHER_TOOL]),
    "tool-call-and-response": dict(messages=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "need two calls",
         "tool_calls": [CALL, {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "24C"}], tools=[WEATHER_TOOL]),
    "no-generation-prompt": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                 add_generation_prompt=False),
    "unicode": dict(messages=[{"role": "user", "content": "Ünïcödé 你好 🚀 <b>html</b>"}], tools=[{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "description": "météo <à> \"ville\""}}]),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_transformers(tiny_qwen3: Path, name: str) -> None:
    from transformers import AutoTokenizer

    case = dict(CONVERSATIONS[name])
    add_generation_prompt = case.pop("add_generation_prompt", True)
    reference = AutoTokenizer.from_pretrained(tiny_qwen3)
    want = reference.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in case.items() if k not in ("messages", "tools")})
    ours = Tokenizer.from_dir(tiny_qwen3)
    got = ours.apply_chat_template(case["messages"], tools=case.get("tools"), add_generation_prompt=add_generation_prompt,
                                   **{k: v for k, v in case.items() if k not in ("messages", "tools")})
    assert got == want
    assert ours.encode(got) == reference(want, add_special_tokens=False)["input_ids"]


def test_template_conventions(tiny_qwen3: Path) -> None:
    tok = Tokenizer.from_dir(tiny_qwen3)
    off = tok.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    history = tok.apply_chat_template(CONVERSATIONS["multi-turn-drops-earlier-thinking"]["messages"])
    assert "add them" not in history and "add again" not in history
    loop = tok.apply_chat_template(CONVERSATIONS["tool-call-and-response"]["messages"], tools=[WEATHER_TOOL])
    assert "<think>\nneed two calls\n</think>" in loop  # thinking kept inside an open tool loop
    assert loop.count("<tool_response>") == 2 and loop.count("<|im_start|>user") == 2


def test_special_tokens_encode_as_single_ids(tiny_qwen3: Path) -> None:
    tok = Tokenizer.from_dir(tiny_qwen3)
    for token in ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]:
        assert len(tok.encode(token)) == 1
    assert tok.eos_token_ids[0] == 2 and tok.token_to_id("<|im_end|>") in tok.eos_token_ids
