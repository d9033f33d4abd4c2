"""Scripted checkpoints (tests/scripted.py): greedy decoding through qwenstack emits each case's script exactly
after a thinking-on prompt and its answer after a thinking-off one; transformers agrees token for token."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripted import CASES, ScriptedCheckpoint, build_case, build_scripted_checkpoint
from qwenstack.engine.params import SamplingParams
from qwenstack.llm import LLM
from qwenstack.serving.parsers import parse_chat_output
from qwenstack.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}]
GREEDY = SamplingParams(temperature=0, max_tokens=200)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScriptedCheckpoint]:
    root = tmp_path_factory.mktemp("scripted")
    return {name: build_case(root / name, name) for name in CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_output_is_the_script(cases: dict[str, ScriptedCheckpoint], name: str) -> None:
    ckpt = cases[name]
    llm = LLM(ckpt.path, device="cpu", kv_cache_memory=2**22)  # the default dtype, bfloat16, as served
    tools = TOOLS if "tool" in name else None
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": ckpt.answer}, {"role": "user", "content": "And now?"}]
    prompts = [llm.tokenizer.apply_chat_template(c, tools=tools, enable_thinking=think)
               for c in (conversation[1:2], conversation) for think in (True, False)]
    outs = [o.outputs[0] for o in llm.generate(prompts, GREEDY)]
    for i, out in enumerate(outs):
        thinking = i % 2 == 0
        want_text = ckpt.script if thinking else ckpt.answer
        want_ids = ckpt.script_token_ids if thinking else ckpt.answer_token_ids
        assert out.text == want_text, f"prompt {i}"
        assert out.token_ids == want_ids, f"prompt {i}"
        assert out.finish_reason == "stop"


def test_cases_parse_as_their_names_say() -> None:
    def parse(name: str):  # noqa: ANN202
        return parse_chat_output(CASES[name], tools_enabled=True, tool_schemas=TOOLS)

    m = parse("think_answer")
    assert m.reasoning and m.content == "Hello! How can I help you today?" and not m.tool_calls
    m = parse("tool_call")
    assert [c.name for c in m.tool_calls] == ["get_weather"] and m.content is None
    assert json.loads(m.tool_calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    m = parse("parallel_tool_calls")
    assert [json.loads(c.arguments)["city"] for c in m.tool_calls] == ["Paris", "Berlin"]
    m = parse("think_mentions_tool_call")
    assert "<tool_call>" in (m.reasoning or "")
    assert [json.loads(c.arguments) for c in m.tool_calls] == [{"city": "Rome"}]
    m = parse("malformed_tool_call")
    assert not m.tool_calls and "<tool_call>" in (m.content or "")
    m = parse("long_think")
    assert (m.reasoning or "").count("Step") >= 10 and m.content == "The answer is 42."


def test_transformers_generates_the_same_tokens(cases: dict[str, ScriptedCheckpoint]) -> None:
    import transformers

    ckpt = cases["parallel_tool_calls"]
    llm = LLM(ckpt.path, dtype="float32", device="cpu", kv_cache_memory=2**22)
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris and Berlin?"}], tools=TOOLS))
    ours = llm.generate([ids], GREEDY)[0].outputs[0].token_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=200, do_sample=False,
                             eos_token_id=llm.tokenizer.eos_token_ids, pad_token_id=0)
    assert out[0, len(ids):].tolist() == ours == ckpt.script_token_ids
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.path)
    assert hf_tokenizer.decode(ours, skip_special_tokens=True) == ckpt.script
    assert hf_tokenizer.encode("Weather?\n\n", add_special_tokens=False) == llm.tokenizer.encode("Weather?\n\n")


def test_pieces_never_appear_when_encoding_prompts(cases: dict[str, ScriptedCheckpoint]) -> None:
    # New pieces are vocabulary entries that no merge produces: the script's own text encodes without them.
    from checkpoints import tiny_tokenizer

    ckpt = cases["think_answer"]
    tokenizer = Tokenizer.from_dir(ckpt.path)
    base = tiny_tokenizer().get_vocab(with_added_tokens=True)
    new = {i for i in ckpt.script_token_ids if tokenizer.id_to_token(i) not in base}
    assert len(new) >= 5 and not new & set(tokenizer.encode(ckpt.script))


def test_own_chat_template(tmp_path: Path) -> None:
    # The entry is the end of the generation prompt as the checkpoint's own template renders it.
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}Verdict:"
    ckpt = build_scripted_checkpoint(tmp_path, "Safe, no categories.", chat_template=template)
    llm = LLM(ckpt.path, device="cpu", kv_cache_memory=2**22)
    out = llm.chat([{"role": "user", "content": "Is this fine?"}], GREEDY)[0].outputs[0]
    assert out.text == "Safe, no categories." and out.token_ids == ckpt.script_token_ids


@pytest.mark.parametrize("script, message", [
    ("<think>\nnever closed", "never closes"),
    ("a<|im_end|>b", "cannot contain"),
    ("<tool_call><tool_call>x<tool_call><tool_call>y", "two different tokens"),
])
def test_scripts_it_cannot_build_raise(tmp_path: Path, script: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_scripted_checkpoint(tmp_path, script)


def test_after_tool_script_answers_a_tool_result(tmp_path: Path) -> None:
    """A prompt holding a tool result (anywhere, however far back) gets the after-tool text; any other prompt the
    script; both in bfloat16 through the engine."""
    after = "Paris is sunny and Berlin is rainy."
    ckpt = build_scripted_checkpoint(tmp_path, CASES["parallel_tool_calls"], after_tool=after)
    llm = LLM(ckpt.path, device="cpu", kv_cache_memory=2**22)
    tok = llm.tokenizer
    first = [{"role": "user", "content": "Weather in Paris and Berlin?"}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    with_result = first + [{"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    later = with_result + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "again " * 300}]
    prompts = [tok.apply_chat_template(m, tools=TOOLS, enable_thinking=True) for m in (first, with_result, later)]
    outs = [o.outputs[0] for o in llm.generate(prompts, GREEDY)]
    assert [o.text for o in outs] == [ckpt.script, after, after]
    assert outs[1].token_ids == ckpt.after_tool_token_ids
    with pytest.raises(ValueError, match="after-tool"):  # both start with <think>\n: the entry cannot tell them apart
        build_scripted_checkpoint(tmp_path / "bad", CASES["tool_call"], after_tool=CASES["think_answer"])
