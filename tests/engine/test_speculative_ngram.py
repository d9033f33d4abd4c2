"""Prompt-lookup speculative decoding (EngineConfig speculative_method "ngram"): drafts are the tokens that followed
an earlier occurrence of the sequence's last n tokens. Must-show, as for the MTP head (test_speculative.py):
greedy output token-identical to decoding without drafts, on a dense model and on Qwen3-Next's recurrent state,
with drafts both accepted and rejected; sampling keeps the target distribution (a point-mass draft accepted
with probability p(d), a rejection drawn from p without d); the blocks all come back.
"""
from __future__ import annotations

import collections
import dataclasses
import random
from pathlib import Path

import pytest
import torch

from checkpoints import build_hf_checkpoint, dense_config, next_config
from failing_requests import refuse_after, run_through_failures
from sampling_stats import chi_square_p_value, exact_distribution
from scripted import build_scripted_checkpoint
from qwenstack.engine import speculative
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.speculative import prompt_lookup
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_prompt_lookup_finds_the_longest_most_recent_match() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert prompt_lookup(tokens, 3, 1, 4) == [7, 8, 5]  # "2 3" twice: the more recent one, at 5-6
    assert prompt_lookup(tokens + [7], 2, 1, 4) == [8, 5]  # "2 3 7" (n=3) beats the later "7" alone
    assert prompt_lookup([4, 5, 6], 3, 1, 4) == []  # nothing repeats
    assert prompt_lookup([4, 5, 6, 5], 3, 2, 4) == []  # "5" repeats, but min_n is 2
    assert prompt_lookup([4, 5, 6, 5], 3, 1, 4) == [6, 5]  # the continuation may run into the suffix itself
    assert prompt_lookup([7, 7, 7, 7], 2, 1, 3) == [7]  # overlapping matches, cut where the tokens end
    # 256 then 0 is bytes 00 01 00 00 00 00 00 00, which holds 1's bytes (01 00 00 00) off a token boundary.
    assert prompt_lookup([256, 0, 1], 2, 1, 2) == []
    assert prompt_lookup([1, 256, 0, 1], 2, 1, 2) == [256, 0]
    assert prompt_lookup(list(range(10)) * 3, 4, 2, 4) == [0, 1, 2, 3]


SCRIPT = ("<think>\nThe user wants the list again.\n</think>\n\nRed, green, blue, cyan, magenta, yellow, "
          "black and white.")


@pytest.fixture(scope="module")
def copier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], list[int]]:
    """A scripted model (greedy: the script after a chat prompt), the chat prompt's ids and the script's."""
    ckpt = build_scripted_checkpoint(tmp_path_factory.mktemp("copier"), SCRIPT)
    tok = Tokenizer.from_dir(ckpt.path)
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "The colours?"}]))
    return ckpt.path, chat, ckpt.script_token_ids[:-1]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("dense"), "qwen3", dense_config(num_hidden_layers=2), seed=4)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("next"), "qwen3_next", next_config(), seed=2)


def engine_for(path: Path, k: int, **options: object) -> LLMEngine:
    tok = Tokenizer.from_dir(path)
    fields = {"block_size": 4, "kv_cache_memory": 2**21, "speculative_tokens": k, "speculative_method": "ngram",
              "prompt_lookup_min": 1, **options}
    config = EngineConfig(**fields)  # type: ignore[arg-type]
    return LLMEngine(load_model(path, dtype=torch.float32), tok, tok.eos_token_ids, config)


def greedy(engine: LLMEngine, batch: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate_all(batch, [GREEDY] * len(batch))]


def assert_clean(engine: LLMEngine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # draft blocks returned too
    if engine.state_slots is not None:
        assert sorted(engine.state_slots.free) == list(range(engine.config.max_num_seqs))


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 9}], ids=["batched", "chunked-prefill"])
def test_a_quoted_answer_is_drafted_and_accepted(copier: tuple[Path, list[int], list[int]], options: dict) -> None:
    """The answer quotes the prompt: lookup drafts it. One prompt quotes it exactly (drafts accepted), one with
    every fourth token changed (drafts cut short: rejected and rolled back), one not at all (nothing drafted)."""
    path, chat, script = copier
    altered = [t if i % 4 else script[(i + 1) % len(script)] for i, t in enumerate(script)]
    batch = [script + chat, altered + chat, chat]
    want = greedy(engine_for(path, 0, **options), batch)
    assert want[0][:len(script)] == script  # the model does say the script
    engine = engine_for(path, 4, **options)
    assert greedy(engine, batch) == want
    stats = engine.stats()
    drafted, accepted = stats["spec_draft_tokens"], stats["spec_accepted_tokens"]
    print(f"\nscripted, {options or 'no budget'}: {accepted}/{drafted} lookup drafts accepted, "
          f"{engine.runner.stats.verify_passes} verify passes for {engine.counters.generation_tokens} tokens")
    assert 0 < accepted < drafted  # both paths: accept, and reject with roll-back
    assert engine.runner.stats.verify_passes * 2 < engine.counters.generation_tokens  # fewer steps than tokens
    assert_clean(engine)


@pytest.mark.parametrize("model", ["dense", "hybrid"])
def test_greedy_with_lookup_is_token_identical_on_random_models(model: str, request: pytest.FixtureRequest) -> None:
    """Random weights rarely continue the prompt: drafts are made and rejected, and the output must not change
    (on Qwen3-Next, the recurrent state rolls back through the state journal)."""
    path = request.getfixturevalue(model)
    rng = random.Random(1)
    phrase = [rng.randrange(3, 400) for _ in range(12)]
    batch = [phrase * 4, [rng.randrange(3, 400) for _ in range(30)] + phrase * 2, [5], phrase[:3] * 9]
    want = greedy(engine_for(path, 0), batch)
    engine = engine_for(path, 3)
    assert greedy(engine, batch) == want
    assert engine.stats()["spec_draft_tokens"] > 0
    assert_clean(engine)


SAMPLE = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
NUM_SAMPLES = 600


def test_sampling_with_point_mass_drafts_keeps_the_distribution(dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acceptance rule for a point-mass draft, whatever proposes it: here each step's draft is the target's
    most likely next token (often right, never certain), so only the p(d) coin and the draw from p without d
    give back the model's own distribution over three sampled tokens."""
    prompt = [5, 9, 14, 200, 31]
    expected = exact_distribution(load_model(dense, dtype=torch.float32), prompt, SAMPLE)
    prefix_mass: dict[tuple[int, ...], float] = collections.defaultdict(float)
    for sequence, p in expected.items():
        for cut in range(1, len(sequence) + 1):
            prefix_mass[sequence[:cut]] += p
    likeliest = {}  # an output so far -> its likeliest next token
    for prefix in sorted(prefix_mass, key=prefix_mass.__getitem__):  # ascending: the likeliest written last
        likeliest[prefix[:-1]] = prefix[-1]

    def propose(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
        out, drafts = tuple(tokens[len(prompt):]), []
        while len(drafts) < k and out + tuple(drafts) in likeliest:
            drafts.append(likeliest[out + tuple(drafts)])
        return drafts

    monkeypatch.setattr(speculative, "prompt_lookup", propose)

    def counts() -> tuple[collections.Counter, dict]:
        engine = engine_for(dense, 2, kv_cache_memory=2**22, max_num_seqs=200, prompt_lookup_max_batch=None)
        outs = engine.generate_all([prompt] * NUM_SAMPLES, [dataclasses.replace(SAMPLE, seed=i)
                                                             for i in range(NUM_SAMPLES)])
        return collections.Counter(tuple(o.outputs[0].token_ids) for o in outs), engine.stats()

    got, stats = counts()
    rate = stats["spec_accepted_tokens"] / max(stats["spec_draft_tokens"], 1)
    p_value = chi_square_p_value(got, expected, NUM_SAMPLES)
    print(f"\npoint-mass drafts: {rate:.0%} of {stats['spec_draft_tokens']} accepted; chi-square p = {p_value:.3f}")
    assert stats["spec_draft_tokens"] >= NUM_SAMPLES and 0.1 < rate < 0.9
    assert p_value > 1e-3
    # The test has teeth: accepting every draft without the p(d) coin skews the tokens towards the drafts.
    monkeypatch.setattr(speculative, "_uniform", lambda generator: 0.0)
    biased, _ = counts()
    assert chi_square_p_value(biased, expected, NUM_SAMPLES) < 1e-6


def test_an_unknown_method_or_lookup_window_is_refused(dense: Path) -> None:
    with pytest.raises(ValueError, match="speculative method"):
        engine_for(dense, 2, speculative_method="eagle")
    with pytest.raises(ValueError, match="prompt lookup"):
        engine_for(dense, 2, prompt_lookup_min=3, prompt_lookup_max=2)


def test_llm_server_and_cli_wiring(copier: tuple[Path, list[int], list[int]]) -> None:
    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import serve_config_from_args
    from qwenstack.engine.speculative import SpeculativeRunner
    from qwenstack.llm import LLM
    from qwenstack.serving.config import ModelSpec
    from qwenstack.serving.served import load_served_model

    path, chat, script = copier
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory=2**21, speculative_tokens=3,
              speculative_method="ngram")  # a dense model: no MTP head is looked for
    out = llm.generate([script + chat], SamplingParams(temperature=0, max_tokens=len(script)))[0].outputs[0]
    assert out.token_ids == script and llm.engine.stats()["spec_accepted_tokens"] > 0
    served = load_served_model(ModelSpec(model=str(path), dtype="float32", device="cpu", speculative_tokens=2,
                                         speculative_method="ngram"), 2**21)
    runner = served.engine.engine.runner
    assert isinstance(runner, SpeculativeRunner) and runner.method == "ngram" and runner.k == 2
    served.engine.shutdown()
    args = build_parser(discover_commands()[0]).parse_args(["serve", "m", "--speculative-tokens", "4",
                                                            "--speculative-method", "ngram"])
    spec = serve_config_from_args(args)["models"][0]
    assert (spec["speculative_tokens"], spec["speculative_method"]) == (4, "ngram")


def test_no_drafts_in_steps_of_many_sequences(copier: tuple[Path, list[int], list[int]]) -> None:
    """Past prompt_lookup_max_batch sequences a step drafts nothing (verify rows would make it compute-bound)."""
    path, chat, script = copier
    batch = [script + chat] * 3
    few = engine_for(path, 4, prompt_lookup_max_batch=3)
    many = engine_for(path, 4, prompt_lookup_max_batch=2)
    assert greedy(few, batch) == greedy(many, batch)
    assert few.stats()["spec_draft_tokens"] > 0 and many.stats()["spec_draft_tokens"] == 0


def test_greedy_identical_under_preemption(copier: tuple[Path, list[int], list[int]]) -> None:
    """32 blocks of 4 tokens hold one request (45 + 40 tokens) and its drafts' lookahead, not four: requests are
    preempted and recomputed mid-draft, and the tokens and blocks come out as without drafts."""
    path, chat, script = copier
    batch = [script + chat] * 4
    want = greedy(engine_for(path, 0), batch)
    engine = engine_for(path, 4, kv_cache_memory=32 * 4 * 512, enable_prefix_caching=False)  # 512 bytes a token
    assert greedy(engine, batch) == want
    assert engine.counters.preemptions > 0 and engine.stats()["spec_accepted_tokens"] > 0
    assert_clean(engine)


def test_a_sequence_whose_lookups_keep_missing_backs_off(dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts that are never right (a token the model does not write): after two empty verifies a sequence
    skips 4, 8, 16, then 32 steps of drafting, so 40 tokens cost a handful of verifies, not 40."""
    prompt = [5, 9, 14, 200, 31]
    want = greedy(engine_for(dense, 0), [prompt])
    never = [t for t in range(3, 512) if t not in want[0]][0]
    monkeypatch.setattr(speculative, "prompt_lookup", lambda tokens, k, lo, hi: [never] * k)
    engine = engine_for(dense, 3)
    assert greedy(engine, [prompt]) == want
    assert engine.stats()["spec_accepted_tokens"] == 0 and 3 <= engine.runner.stats.verify_passes <= 7


def test_accepted_drafts_carry_the_logprobs_of_plain_decoding(copier: tuple[Path, list[int], list[int]]) -> None:
    path, chat, script = copier
    params = SamplingParams(temperature=0, max_tokens=30, logprobs=2, ignore_eos=True)

    def run(k: int) -> tuple[list[int], list[list[tuple[int, float]]]]:
        engine = engine_for(path, k)
        out = engine.generate_all([script + chat], [params])[0].outputs[0]
        assert k == 0 or engine.stats()["spec_accepted_tokens"] > 0
        ranked = [sorted(((t, lp.logprob) for t, lp in entry.items()), key=lambda x: -x[1]) for entry in out.logprobs]
        return out.token_ids, ranked

    plain_tokens, plain_lp = run(0)
    tokens, lp = run(4)
    assert tokens == plain_tokens and len(lp) == len(plain_lp) == 30
    for got, want in zip(lp, plain_lp):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)


def test_a_request_failing_beside_drafting_ones_leaves_them_as_they_were(
        copier: tuple[Path, list[int], list[int]]) -> None:
    """A request whose processor leaves no token ends in a step where others draft: their tokens are those of
    plain decoding, and its failed row (token -1) is never drafted from."""
    path, chat, script = copier
    batch = [script + chat, chat]
    want = greedy(engine_for(path, 0), batch)
    engine = engine_for(path, 4)
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), prompt, GREEDY)
    engine.add_request("bad", chat, dataclasses.replace(GREEDY, logits_processors=[refuse_after(2)]))
    tokens, failed = run_through_failures(engine)
    assert failed == ["bad"] and [tokens["0"], tokens["1"]] == want
    assert engine.stats()["spec_accepted_tokens"] > 0
    assert_clean(engine)
