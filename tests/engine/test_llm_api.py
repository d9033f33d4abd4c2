"""The offline `LLM` API as a vLLM user drives it, on the bundled demo model: vLLM's prompt dicts, llm.chat's
keywords (chat_template_kwargs, chat_template, add_generation_prompt, continue_final_message), max_tokens capped
to the context, vLLM's constructor options, and bad SamplingParams refused up front without leaving the LLM
broken for the next call."""
from __future__ import annotations

import math

import pytest

from qwenstack import LLM, SamplingParams
from qwenstack.errors import RequestError

GREEDY = SamplingParams(temperature=0, max_tokens=8)
HELLO = [{"role": "user", "content": "Good morrow."}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="auto", gpu_memory_utilization=0.9, trust_remote_code=True, enforce_eager=True)


def test_vllm_prompt_dicts_are_the_prompts_they_hold(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("ROMEO: But soft")
    plain = llm.generate(["ROMEO: But soft"], GREEDY)[0]
    for prompt in ({"prompt": "ROMEO: But soft"}, {"prompt_token_ids": ids}, [{"prompt_token_ids": ids}]):
        out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids and out.prompt_token_ids == ids
        assert out.prompt == "ROMEO: But soft"  # the decoded text for token prompts too, as vLLM gives
    with pytest.raises(RequestError, match="'prompt' \\(text\\) or 'prompt_token_ids'"):
        llm.generate({"prompt_ids": ids}, GREEDY)
    with pytest.raises(RequestError, match="prompt 1 must be"):
        llm.generate(["fine", 3.5], GREEDY)  # type: ignore[list-item]


BAD_PARAMS = [
    (dict(stop=[5]), "stop"),
    (dict(stop=5), "stop"),
    (dict(seed="a"), "seed"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_tokens="5"), "max_tokens"),
    (dict(stop_token_ids=["x"]), "stop_token_ids"),
]


@pytest.mark.parametrize("fields, name", BAD_PARAMS, ids=[n for _, n in BAD_PARAMS])
def test_bad_sampling_params_are_refused_by_name(fields: dict, name: str) -> None:
    with pytest.raises(RequestError, match=name):
        SamplingParams(**fields)


def test_a_failed_call_leaves_the_llm_working(llm: LLM) -> None:
    """A request that fails inside the engine (here a processor that raises) is removed from it: the next call
    answers, where every later call had failed with the same error."""
    def broken(output_ids: list[int], logits: object) -> object:
        raise ValueError("this processor is broken")

    with pytest.raises(Exception, match="broken"):
        llm.generate(["ROMEO:", "JULIET:"], SamplingParams(temperature=0.5, max_tokens=4, logits_processors=[broken]))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("ROMEO:", GREEDY)[0].outputs[0].token_ids


def test_chat_takes_vllms_keywords(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    off = llm.chat(HELLO, GREEDY, chat_template_kwargs={"enable_thinking": False})[0]
    assert off.prompt == tok.apply_chat_template(HELLO, enable_thinking=False)
    assert off.prompt == llm.chat(HELLO, GREEDY, enable_thinking=False)[0].prompt
    assert off.prompt != llm.chat(HELLO, GREEDY)[0].prompt  # thinking on by default, as Qwen3's template
    own = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}>{% endif %}")
    assert llm.chat(HELLO, GREEDY, chat_template=own)[0].prompt == "<user>Good morrow.>"
    bare = llm.chat(HELLO, GREEDY, chat_template=own, add_generation_prompt=False)[0]
    assert bare.prompt == "<user>Good morrow."
    prefill = HELLO + [{"role": "assistant", "content": "Good morrow, my"}]
    cont = llm.chat(prefill, GREEDY, continue_final_message=True, add_generation_prompt=False,
                    chat_template_kwargs={"enable_thinking": False})[0]
    assert cont.prompt.endswith("Good morrow, my") and cont.outputs[0].token_ids
    with pytest.raises(RequestError, match="continue_final_message"):
        llm.chat(HELLO, GREEDY, continue_final_message=True)
    with pytest.raises(RequestError, match="a conversation"):
        llm.chat("Hi", GREEDY)  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="one SamplingParams"):
        llm.chat(HELLO, [GREEDY, GREEDY])


def test_max_tokens_past_the_context_stop_at_its_end(llm: LLM) -> None:
    """As vLLM's offline LLM: the sequence stops at max_model_len with finish_reason "length"."""
    prompt = llm.get_tokenizer().encode("ROMEO: " * 200)[: llm.engine.max_model_len - 6]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_constructor_options_that_cannot_hold_are_refused() -> None:
    with pytest.raises(ValueError, match="-tp 2"):
        LLM(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(max_model_len=0)
    from qwenstack.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device 'bogus'"):
        LLM(device="bogus")


def test_float16_runs_where_onednn_cannot_pack_it() -> None:
    """float16 weights on a CPU without AVX512-FP16 (oneDNN's reorder raises there) stay unpacked, as float32's
    do, instead of failing at load."""
    fp16 = LLM(dtype="float16")
    assert fp16.generate("ROMEO:", GREEDY)[0].outputs[0].token_ids
