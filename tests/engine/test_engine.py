"""The engine against the reference greedy path and transformers: batching, prefix caching, preemption,
chunked prefill, sampling, stop conditions, logprobs, aborts and validation."""
from __future__ import annotations

import asyncio
import gc
import logging
import random
import weakref
from pathlib import Path

import pytest
import torch

from checkpoints import load_hf
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make_engine(path: Path, **options) -> LLMEngine:
    model = load_model(path, dtype=torch.float32)
    tok = Tokenizer.from_dir(path)
    config = EngineConfig(**{"block_size": 4, "kv_cache_memory": 2**22, **options})
    return LLMEngine(model, tok, tok.eos_token_ids, config)


def mixed_prompts(count: int, seed: int = 0, shared_prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = shared_prefix or []
    return [prefix + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


@pytest.fixture(scope="module")
def reference(tiny_qwen3: Path) -> dict:
    model = load_model(tiny_qwen3, dtype=torch.float32)
    prompts = mixed_prompts(16) + mixed_prompts(4, seed=1, shared_prefix=list(range(10, 30)))
    return {"prompts": prompts, "tokens": greedy_generate(model, prompts, 24, block_size=8)}


CONFIGS = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "tiny-pool-preempts": {"kv_cache_memory": 2 * 2 * 16 * 2 * 4 * 4 * 28},  # 28 blocks of 4 tokens
    "chunked-prefill": {"max_num_batched_tokens": 7},
    "few-seqs": {"max_num_seqs": 3},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_batch_matches_reference(tiny_qwen3: Path, reference: dict, name: str) -> None:
    engine = make_engine(tiny_qwen3, **CONFIGS[name])
    outs = engine.generate_all(reference["prompts"], [GREEDY] * len(reference["prompts"]))
    assert [o.outputs[0].token_ids for o in outs] == reference["tokens"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if name == "tiny-pool-preempts":
        assert engine.counters.preemptions > 0


def test_each_request_alone_matches_transformers(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3)
    hf = load_hf(tiny_qwen3)
    for prompt in mixed_prompts(3, seed=5):
        got = engine.generate_all([prompt], [GREEDY])[0].outputs[0].token_ids
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == want


def test_prefix_cache_hit_gives_same_tokens(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3)
    prompt = list(range(20, 60))
    first = engine.generate_all([prompt], [GREEDY])[0]
    second = engine.generate_all([prompt], [GREEDY])[0]
    assert second.metrics.num_cached_tokens >= 36 and first.metrics.num_cached_tokens == 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids


def test_seeded_sampling_same_alone_and_in_batch(tiny_qwen3: Path) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    prompt = [7, 8, 9, 10]
    alone = make_engine(tiny_qwen3).generate_all([prompt], [params])[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True) for _ in range(5)]
    batch = make_engine(tiny_qwen3, seed=99).generate_all(mixed_prompts(5) + [prompt], others + [params])
    assert batch[-1].outputs[0].token_ids == alone
    unseeded = make_engine(tiny_qwen3).generate_all([prompt] * 2, [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 2)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_samples_share_prompt_blocks(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3)
    prompt = list(range(30, 70))
    out = engine.generate_all([prompt], [SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)])[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert engine.block_manager.stats.hits >= 2 * 36  # both siblings reused the prompt's full blocks


def test_stop_token_and_eos(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3)
    prompt = [5, 6, 7]
    free = engine.generate_all([prompt], [GREEDY])[0].outputs[0].token_ids
    stop_at = free[5]
    out = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at], ignore_eos=True)])[0].outputs[0]
    assert out.token_ids == free[: free.index(stop_at) + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # The stopping token is in token_ids, not in the text (vLLM's), unless include_stop_str_in_output asks for it.
    before = engine.decoder.decode(out.token_ids[:-1])
    assert out.text == before
    kept = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at],
                                                         ignore_eos=True, include_stop_str_in_output=True)])[0]
    assert kept.outputs[0].text == engine.decoder.decode(out.token_ids)
    engine.eos_token_ids = (stop_at,)
    out = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=24)])[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
    # The same for eos kept as text (skip_special_tokens=false): an <|im_end|> is not the answer's.
    shown = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=24, skip_special_tokens=False)])
    assert shown[0].outputs[0].text == before
    out = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)])[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 24


def test_stop_string_never_leaks(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3)
    prompt = [11, 12, 13]
    full = engine.generate_all([prompt], [GREEDY])[0].outputs[0].text
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3)
                if "\ufffd" not in full[i:i + 3] and full[i:i + 3].strip() and full[i:i + 3] not in full[:i + 2])
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].delta_text
            assert stop not in streamed
            final = out
    assert final is not None and final.outputs[0].text == full[: full.index(stop)] == streamed
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop


def test_min_tokens_defers_stop_strings(tiny_qwen3: Path) -> None:
    """As vLLM: the text of the first min_tokens tokens is not searched for stop strings (they stopped it)."""
    engine = make_engine(tiny_qwen3)
    prompt = [11, 12, 13]
    out = engine.generate_all([prompt], [GREEDY])[0].outputs[0]
    first = engine.decoder.decode(out.token_ids[:1])
    stop = next(c for c in first if c.strip())  # a character of the very first token's text
    later = len(engine.decoder.decode(out.token_ids[:5]))
    want = out.text[: out.text.find(stop, later)] if stop in out.text[later:] else out.text
    params = SamplingParams(temperature=0, max_tokens=len(out.token_ids), stop=[stop], min_tokens=5, ignore_eos=True)
    got = engine.generate_all([prompt], [params])[0].outputs[0]
    assert len(got.token_ids) >= 5 and got.text == want
    stopped = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=20, stop=[stop])])[0]
    assert stopped.outputs[0].text == out.text[: out.text.index(stop)] and len(stopped.outputs[0].token_ids) == 1


def test_logprobs_and_prompt_logprobs(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3)
    model = engine.model
    prompt = [3, 50, 60, 70, 80, 90]
    out = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2,
                                                        ignore_eos=True)])[0]
    seq = prompt + out.outputs[0].token_ids
    with torch.inference_mode():
        from qwenstack.models.base import prompt_logits

        ref = torch.log_softmax(prompt_logits(model, torch.tensor([seq]))[0].float(), -1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        assert len(entry) >= 2
    for i, lp in enumerate(out.outputs[0].logprobs):
        token = out.outputs[0].token_ids[i]
        assert lp[token].rank == 1 and abs(lp[token].logprob - ref[len(prompt) - 1 + i, token].item()) < 1e-4
        assert len(lp) == 3


def test_penalties_change_output(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3)
    prompt = [5, 6, 7]
    base = engine.generate_all([prompt], [GREEDY])[0].outputs[0].token_ids
    penalised = engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                              repetition_penalty=2.0, frequency_penalty=1.5)])[0].outputs[0].token_ids
    assert penalised != base
    assert len(set(penalised)) >= len(set(base))


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1}, "temperature"), ({"n": 0}, "n must"),
    ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 50}, "logprobs"),
])
def test_bad_sampling_values(kwargs: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_limits_are_named_and_engine_keeps_serving(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3, max_model_len=64)
    with pytest.raises(RequestError, match=r"prompt has 80 tokens.*maximum context length is 64"):
        engine.add_request("long", list(range(3, 83)), GREEDY)
    with pytest.raises(RequestError, match=r"max_tokens=100 is too large.*at most 54"):
        engine.add_request("big", list(range(3, 13)), SamplingParams(max_tokens=100))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("oov", [1, 2, 99999], GREEDY)
    assert engine.generate_all([[5, 6, 7]], [GREEDY])[0].outputs[0].finish_reason == "length"


def test_a_max_model_len_over_the_model_s_is_said(tiny_qwen3: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It was lowered to the model's context length without a word (vLLM refuses it)."""
    with caplog.at_level(logging.WARNING, logger="qwenstack.engine"):
        engine = make_engine(tiny_qwen3, max_model_len=100_000)
    assert engine.max_model_len == 512
    said = "max_model_len=100000 is over this model's context length of 512 (its config.json): serving 512"
    assert said in caplog.text


def test_abort_frees_blocks(tiny_qwen3: Path) -> None:
    engine = make_engine(tiny_qwen3, enable_prefix_caching=False)
    idle = engine.block_manager.num_free_blocks
    engine.add_request("a", list(range(5, 45)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(5, 25)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < idle
    engine.abort("a")
    engine.abort("b")
    assert engine.block_manager.num_free_blocks == idle and not engine.has_unfinished_requests()


def test_a_dropped_engine_frees_its_kv_pool_at_once(tiny_qwen3: Path) -> None:
    """No reference cycle keeps an engine (and its KV pool, gigabytes on a real model) alive until the cyclic
    garbage collector happens to run: a benchmark making one engine per measurement ran out of memory."""
    engine = make_engine(tiny_qwen3)
    engine.generate_all([list(range(5, 15))], [GREEDY])
    kv = weakref.ref(engine.runner.kv_caches[0])
    dropped = weakref.ref(engine)
    gc.collect()
    gc.disable()
    try:
        del engine
        assert dropped() is None and kv() is None
    finally:
        gc.enable()


def test_async_engine_streams_and_aborts(tiny_qwen3: Path) -> None:
    from qwenstack.engine.async_engine import AsyncEngine

    engine = make_engine(tiny_qwen3)
    async_engine = AsyncEngine(engine)
    idle = engine.block_manager.num_free_blocks

    async def run() -> tuple[list[int], int]:
        tokens: list[int] = []
        async for out in async_engine.generate([5, 6, 7], GREEDY):
            tokens.extend(out.outputs[0].delta_token_ids)
        stream = async_engine.generate(list(range(5, 30)), SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        count = 0
        async for _ in stream:
            count += 1
            if count == 3:
                break
        await stream.aclose()
        with pytest.raises(RequestError):
            async for _ in async_engine.generate([5] * 5000, GREEDY):
                pass
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.block_manager.num_free_blocks == idle and not engine.has_unfinished_requests():
                break
        return tokens, count

    try:
        tokens, count = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert len(tokens) == 24 and count == 3
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == idle


def test_detokenizer_never_emits_broken_utf8(tiny_qwen3: Path) -> None:
    from qwenstack.engine.detokenizer import IncrementalDetokenizer

    tok = Tokenizer.from_dir(tiny_qwen3)
    text = "héllo 你好 🚀✨ wörld"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.take_delta())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_a_request_s_n_samples_are_admitted_together(tiny_qwen3: Path) -> None:
    """The queue bound counted only a request's first sample; the others, queued once its prompt was cached,
    overflowed it inside step() and failed every running request."""
    from qwenstack.engine.scheduler import QueueFullError

    engine = make_engine(tiny_qwen3, max_waiting=4)
    with pytest.raises(QueueFullError):
        engine.add_request("many", [5, 6, 7], SamplingParams(n=5, temperature=1.0, max_tokens=4))
    assert not engine.has_unfinished_requests()
    engine.add_request("four", [5, 6, 7], SamplingParams(n=4, temperature=1.0, max_tokens=4))
    for i in range(3):  # the queue fills up while the siblings wait for the prompt
        engine.add_request(str(i), [8 + i, 9], SamplingParams(temperature=0, max_tokens=4))
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}  # the siblings join it: never an error
    assert finished == {"four", "0", "1", "2"}


def test_unchunked_prefill_refuses_a_sequence_no_step_can_hold(tiny_qwen3: Path) -> None:
    """With chunked prefill off and a step budget under the sequence, generate() waited for ever (vLLM refuses
    such a configuration); the request is refused, and one that fits runs."""
    engine = make_engine(tiny_qwen3, enable_chunked_prefill=False, max_num_batched_tokens=64)
    with pytest.raises(RequestError, match="over max_num_batched_tokens=64"):
        engine.generate_all([list(range(3, 103))], [SamplingParams(temperature=0, max_tokens=4)])
    with pytest.raises(RequestError, match="may reach 70 tokens"):  # the output counts: a preemption recomputes it
        engine.generate_all([list(range(3, 53))], [SamplingParams(temperature=0, max_tokens=20)])
    out = engine.generate_all([list(range(3, 53))], [SamplingParams(temperature=0, max_tokens=10)])[0]
    assert len(out.outputs[0].token_ids) <= 10


def test_a_shut_down_engine_refuses_at_once(tiny_qwen3: Path) -> None:
    """A request to an engine that was shut down (its app stopped) waited for ever on a queue nobody reads."""
    import asyncio

    from qwenstack.engine.async_engine import AsyncEngine
    from qwenstack.errors import EngineUnavailableError

    async_engine = AsyncEngine(make_engine(tiny_qwen3), "tiny")
    async_engine.shutdown()

    async def ask() -> None:
        async for _ in async_engine.generate([5, 6, 7], GREEDY):
            pass

    with pytest.raises(EngineUnavailableError, match="the engine tiny has shut down"):
        asyncio.run(asyncio.wait_for(ask(), 10))
