"""MTP speculative decoding for Qwen3-Next (engine/speculative.py, models/qwen3_next_mtp.py).

Checkpoints: tiny random Qwen3-Next checkpoints from transformers, to which we add the `mtp.*` tensors
ourselves (transformers neither builds nor saves them), in two flavours:
- "random": a random head, whose drafts are almost always rejected. Every verify pass then rolls the
  recurrent state back from 1 + k tokens to 1, on an unmodified random main model.
- "copy-like": the main model's block outputs (o_proj, out_proj, down_proj) are scaled by COPY_SCALE, so its
  next token depends mostly on the current one through embed -> final norm -> lm_head; the head is made to
  compute that same map for the token it is given: fc = [I | 0] (keep the embedding half, drop the hidden
  half), pre_fc_norm_embedding scale 1, its layer's outputs scaled alike, mtp.norm = model.norm. So it
  drafts what the main model will most likely say, and acceptance is partial (all drafts accepted at
  COPY_SCALE = 0, which the all-accepted test uses).

Must-show: greedy output with speculation token-identical to greedy without it (k = 1, 2, 3, several prompts
batched, with a chunked-prefill budget, with preemption); the acceptance rate reported (printed; run with
-s to see it); sampling with speculation passes a chi-square test against the exact distribution of the
first tokens, and the same test rejects a sampler that accepts drafts without the rejection rule.
"""
from __future__ import annotations

import collections
import functools
import dataclasses
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sampling_stats
from checkpoints import build_hf_checkpoint, next_config
from sampling_stats import chi_square_p_value
from qwenstack.config import read_config
from qwenstack.engine import speculative
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.speculative import SpeculativeRunner
from qwenstack.errors import CheckpointError
from qwenstack.engine.reference import allocate_kv_caches, greedy_generate
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import layer_caches
from qwenstack.models.qwen3_next import Qwen3NextArgs, StateJournal
from qwenstack.models.qwen3_next_mtp import MTPHead, load_mtp_head, mtp_checkpoint_tensors
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer

COPY_SCALE = 0.05
SCALED = ("o_proj.weight", "linear_attn.out_proj.weight", "down_proj.weight")
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def with_mtp(src: Path, dst: Path, seed: int = 0, copy_scale: float | None = None, sharpen: float = 1.0) -> Path:
    """A copy of checkpoint src plus random (or copy-like, see the module docstring) mtp.* tensors.
    sharpen > 1 multiplies the copy-like head's logits (its final norm's scale), as a lower temperature would."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    args = Qwen3NextArgs.from_dict(read_config(src))
    g = torch.Generator().manual_seed(seed)
    head = MTPHead(args)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.1)
        if copy_scale is not None:
            for name in list(tensors):
                if name.startswith("model.layers.") and name.endswith(SCALED):
                    tensors[name] = tensors[name] * copy_scale
            h = args.hidden_size
            head.fc.weight.zero_()
            head.fc.weight[:, :h] = torch.eye(h)
            head.pre_fc_norm_embedding.weight.zero_()  # zero-centred: scale 1
            head.norm.weight.copy_(sharpen * (1 + tensors["model.norm.weight"]) - 1)  # zero-centred
            for name, p in head.layers[0].named_parameters():
                if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
                    p.mul_(copy_scale)
    tensors.update(mtp_checkpoint_tensors(head))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("next"), "qwen3_next", next_config(), seed=2)


@pytest.fixture(scope="module")
def random_mtp(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_mtp(base, tmp_path_factory.mktemp("mtp") / "random")


@pytest.fixture(scope="module")
def copy_mtp(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_mtp(base, tmp_path_factory.mktemp("mtp") / "copy", copy_scale=COPY_SCALE)


@pytest.fixture(scope="module")
def sharp_mtp(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_mtp(base, tmp_path_factory.mktemp("mtp") / "sharp", copy_scale=COPY_SCALE, sharpen=3.0)


@pytest.fixture(scope="module")
def exact_mtp(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_mtp(base, tmp_path_factory.mktemp("mtp") / "exact", copy_scale=0.0)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


PROMPTS = [_prompt(i, n) for i, n in enumerate([1, 5, 30, 70, 12, 3])]


@functools.lru_cache(maxsize=4)
def reference(path: Path) -> list[list[int]]:
    return greedy_generate(load_model(path, dtype=torch.float32), PROMPTS, GREEDY.max_tokens or 0, block_size=4)


def make_engine(path: Path, k: int, **options) -> LLMEngine:
    model = load_model(path, dtype=torch.float32)
    if k:
        load_mtp_head(model, path, torch.float32)
    tok = Tokenizer.from_dir(path)
    config = EngineConfig(**{"block_size": 4, "kv_cache_memory": 2**20, "speculative_tokens": k, **options})
    return LLMEngine(model, tok, tok.eos_token_ids, config)


def acceptance(engine: LLMEngine) -> tuple[int, int, float]:
    stats = engine.stats()
    drafted, accepted = stats["spec_draft_tokens"], stats["spec_accepted_tokens"]
    return drafted, accepted, accepted / max(drafted, 1)


def assert_clean(engine: LLMEngine) -> None:
    assert sorted(engine.state_slots.free) == list(range(engine.config.max_num_seqs))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # draft blocks returned too


# --- loading --------------------------------------------------------------------------------------------------


def test_head_loads_strictly_and_only_on_request(base: Path, random_mtp: Path, tmp_path: Path) -> None:
    model = load_model(random_mtp, dtype=torch.float32)
    assert not hasattr(model, "mtp")  # speculation off: mtp.* ignored as before
    head = load_mtp_head(model, random_mtp, torch.float32)
    assert model.mtp is head and head.fc.weight.shape == (64, 128)
    assert len(head.layers) == 1 and not head.layers[0].is_linear  # full attention, whatever layer_types[0] is
    with pytest.raises(CheckpointError, match=r"mtp\.\* tensors"):
        load_mtp_head(load_model(base, dtype=torch.float32), base, torch.float32)
    broken = tmp_path / "broken"
    shutil.copytree(random_mtp, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["mtp.norm.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mtp\.norm\.weight"):
        load_mtp_head(load_model(broken, dtype=torch.float32), broken, torch.float32)
    tok = Tokenizer.from_dir(base)
    with pytest.raises(ValueError, match="multi-token-prediction head"):
        LLMEngine(load_model(base, dtype=torch.float32), tok, [], EngineConfig(speculative_tokens=2))


def test_llm_and_server_wiring(random_mtp: Path, base: Path) -> None:
    from qwenstack.llm import load
    from qwenstack.serving.config import ModelSpec
    from qwenstack.serving.served import load_served_model

    assert hasattr(load(random_mtp, dtype="float32", device="cpu", speculative=True).model, "mtp")
    with pytest.raises(CheckpointError, match="mtp"):
        load(base, dtype="float32", device="cpu", speculative=True)
    served = load_served_model(ModelSpec(str(random_mtp), dtype="float32", device="cpu", block_size=4,
                                         speculative_tokens=3), 2**20)
    try:
        runner = served.engine.engine.runner
        assert isinstance(runner, SpeculativeRunner) and runner.k == 3
    finally:
        served.engine.shutdown()


# --- model level: the head's cache and the state journal -----------------------------------------------------


def test_head_with_paged_cache_equals_one_pass(random_mtp: Path) -> None:
    """Catch-up over a prompt in two pieces, then one token at a time, equals the head over everything at once."""
    model = load_model(random_mtp, dtype=torch.float32)
    head = load_mtp_head(model, random_mtp, torch.float32)
    tokens = PROMPTS[3][:21]
    n = len(tokens) - 1  # position j reads (h_j, t_{j+1})
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), AttentionBatch.for_prompts([len(tokens)]), None)
        embeds = model.model.embed_tokens(torch.tensor(tokens[1:]))
        want = head(embeds, hidden[:n], torch.arange(n), AttentionBatch.for_prompts([n]), None)
        kv = torch.zeros(2, 8, 4, 2, 16)
        table = torch.arange(8)[None]
        got = []
        for start, end in [(0, 7), (7, 16), (16, 17), (17, 18), (18, 19), (19, 20)]:
            batch = AttentionBatch([end - start], [end], torch.arange(start, end), table, 4)
            got.append(head(embeds[start:end], hidden[start:end], torch.arange(start, end), batch, kv))
    torch.testing.assert_close(torch.cat(got), want, atol=2e-5, rtol=1e-4)


def test_state_journal_keeps_exactly_the_accepted_tokens(random_mtp: Path) -> None:
    """A verify pass (a continuing sequence with 4 new tokens deferred beside a fresh prompt), committed at 2
    tokens, leaves the slots as running only those 2 tokens would; its logits equal the ordinary pass's."""
    model = load_model(random_mtp, dtype=torch.float32)
    a, b = PROMPTS[2][:10], PROMPTS[4]
    new = PROMPTS[3][:4]

    def run(passes: list[tuple[list[int], list[int]]], journal_keep: list[int] | None = None):
        kv = allocate_kv_caches(model, 16, 4, torch.float32)
        states = model.make_state_cache(2, torch.float32, "cpu")
        caches = layer_caches(kv, states)
        tables = torch.tensor([list(range(8)), list(range(8, 16))])
        done = [0, 0]
        out = None
        for i, (toks_a, toks_b) in enumerate(passes):
            seqs = [(0, toks_a), (1, toks_b)] if toks_b else [(0, toks_a)]
            ids = torch.tensor([t for _, toks in seqs for t in toks])
            pos = torch.tensor([p for s, toks in seqs for p in range(done[s], done[s] + len(toks))])
            slots = torch.tensor([tables[s, p // 4] * 4 + p % 4 for s, toks in seqs for p in range(done[s], done[s] + len(toks))])
            batch = AttentionBatch([len(t) for _, t in seqs], [done[s] + len(t) for s, t in seqs], slots,
                                   tables[[s for s, _ in seqs]], 4, state_slots=torch.tensor([s for s, _ in seqs]))
            journal = StateJournal([0]) if journal_keep is not None and i == len(passes) - 1 else None
            with torch.inference_mode():
                out = model.compute_logits(model(ids, pos, batch, caches, state_journal=journal))
            if journal is not None:
                journal.commit(journal_keep)
            for s, toks in seqs:
                done[s] += len(toks)
        return out, [(st.conv_state.clone(), st.recurrent_state.clone()) for st in states if st is not None]

    logits, states = run([(a, []), (new, b)], journal_keep=[2])
    plain_logits, _ = run([(a, []), (new, b)])
    _, want = run([(a, []), (new[:2], b)])
    torch.testing.assert_close(logits, plain_logits, atol=5e-5, rtol=1e-4)  # padded recurrent vs chunked form
    for (conv, rec), (conv_want, rec_want) in zip(states, want):
        torch.testing.assert_close(conv, conv_want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rec, rec_want, atol=1e-5, rtol=1e-4)


# --- engine: greedy identity and acceptance -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 9}], ids=["batched", "chunked-prefill"])
def test_greedy_with_speculation_is_token_identical(copy_mtp: Path, k: int, options: dict) -> None:
    want = reference(copy_mtp)
    engine = make_engine(copy_mtp, k, **options)
    got = [o.outputs[0].token_ids for o in engine.generate_all(PROMPTS, [GREEDY] * len(PROMPTS))]
    assert got == want
    drafted, accepted, rate = acceptance(engine)
    print(f"\ncopy-like head, k={k}, {options or 'no budget'}: {accepted}/{drafted} drafts accepted ({rate:.0%})")
    assert drafted > 0 and 0 < accepted < drafted  # both paths taken: accept and reject-and-roll-back
    assert_clean(engine)


def test_greedy_identical_when_every_draft_is_rejected(random_mtp: Path) -> None:
    """An unmodified random main model, drafts from a random head: the state rolls back on every verify."""
    engine = make_engine(random_mtp, 3)
    got = [o.outputs[0].token_ids for o in engine.generate_all(PROMPTS, [GREEDY] * len(PROMPTS))]
    assert got == reference(random_mtp)
    drafted, accepted, rate = acceptance(engine)
    print(f"\nrandom head, k=3: {accepted}/{drafted} accepted ({rate:.0%})")
    assert drafted > 100 and rate < 0.05


def test_greedy_identical_when_every_draft_is_accepted(exact_mtp: Path) -> None:
    engine = make_engine(exact_mtp, 3)
    got = [o.outputs[0].token_ids for o in engine.generate_all(PROMPTS, [GREEDY] * len(PROMPTS))]
    assert got == reference(exact_mtp)
    drafted, accepted, _ = acceptance(engine)
    assert drafted == accepted > 0
    # k accepted + 1 bonus per verify: far fewer steps than tokens
    assert engine.runner.stats.verify_passes * 2 < engine.counters.generation_tokens


def test_greedy_identical_under_preemption(copy_mtp: Path) -> None:
    # 30 blocks of 4 tokens (3 attention layers with the head's, 2 KV heads of 16 floats): room for the
    # longest request (70 + 20 tokens), not for all at once
    engine = make_engine(copy_mtp, 2, kv_cache_memory=30 * 4 * 3 * 2 * 2 * 16 * 4)
    got = [o.outputs[0].token_ids for o in engine.generate_all(PROMPTS, [GREEDY] * len(PROMPTS))]
    assert got == reference(copy_mtp)
    assert engine.counters.preemptions > 0
    assert_clean(engine)


def test_stop_inside_accepted_drafts(exact_mtp: Path) -> None:
    """max_tokens and stop tokens cut a step's accepted drafts: nothing past them is emitted."""
    want = reference(exact_mtp)
    engine = make_engine(exact_mtp, 3)
    params = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[want[1][5]])]
    outs = engine.generate_all(PROMPTS[:2], params)
    assert outs[0].outputs[0].token_ids == want[0][:7]
    stop_at = want[1].index(want[1][5]) + 1
    assert outs[1].outputs[0].token_ids == want[1][:stop_at]
    assert_clean(engine)


# --- engine: sampling keeps the distribution ------------------------------------------------------------------

SAMPLE = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
SAMPLE_PROMPT = [5, 9, 14, 200, 31]
NUM_SAMPLES = 600


def exact_distribution(path: Path) -> dict[tuple[int, ...], float]:
    return sampling_stats.exact_distribution(load_model(path, dtype=torch.float32), SAMPLE_PROMPT, SAMPLE)


def sample_counts(path: Path, k: int) -> tuple[collections.Counter, LLMEngine]:
    engine = make_engine(path, k, kv_cache_memory=2**22, max_num_seqs=200)
    params = [dataclasses.replace(SAMPLE, seed=i) for i in range(NUM_SAMPLES)]
    outs = engine.generate_all([SAMPLE_PROMPT] * NUM_SAMPLES, params)
    return collections.Counter(tuple(o.outputs[0].token_ids) for o in outs), engine


def test_sampling_with_speculation_keeps_the_distribution(sharp_mtp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head drafts from a sharpened copy of the target (q peaked where p is spread), so drafts are often
    right but over-confident: only the min(1, p/q) rule and the residual draw give back p."""
    expected = exact_distribution(sharp_mtp)
    assert len(expected) == 27 and max(expected.values()) < 0.2  # a spread-out target: 3 x 3 x 3 outcomes
    counts, engine = sample_counts(sharp_mtp, 2)
    drafted, accepted, rate = acceptance(engine)
    p_value = chi_square_p_value(counts, expected, NUM_SAMPLES)
    print(f"\nsampling, k=2: {accepted}/{drafted} accepted ({rate:.0%}); chi-square p = {p_value:.3f}")
    assert drafted >= NUM_SAMPLES and 0.1 < rate < 0.9
    assert p_value > 1e-3
    # The test has teeth: accepting every draft the target allows (no min(1, p/q) coin) skews the tokens
    # towards the head's distribution, and the same test rejects it.
    monkeypatch.setattr(speculative, "_uniform", lambda generator: 0.0)
    biased, _ = sample_counts(sharp_mtp, 2)
    assert chi_square_p_value(biased, expected, NUM_SAMPLES) < 1e-6


def test_logprobs_and_metrics_with_speculation(copy_mtp: Path) -> None:
    """Accepted drafts carry the same logprobs as tokens decoded one by one; /metrics exports the counters."""
    from qwenstack.serving.metrics import _EngineCollector

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outs = {k: make_engine(copy_mtp, k).generate_all(PROMPTS[1:3], [params] * 2) for k in (0, 2)}
    for plain, spec in zip(outs[0], outs[2]):
        assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
        for got, want in zip(spec.outputs[0].logprobs + spec.prompt_logprobs[1:],
                             plain.outputs[0].logprobs + plain.prompt_logprobs[1:]):
            assert got.keys() == want.keys()
            for token in want:
                assert got[token].rank == want[token].rank
                assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)
    engine = make_engine(copy_mtp, 2)
    engine.generate_all(PROMPTS[:2], [GREEDY] * 2)
    families = {m.name: m for m in _EngineCollector(lambda: {"m": engine}).collect()}
    drafted = families["qwenstack:spec_decode_num_draft_tokens"].samples[0].value
    accepted = families["qwenstack:spec_decode_num_accepted_tokens"].samples[0].value
    assert drafted == engine.runner.stats.drafted > accepted == engine.runner.stats.accepted > 0


def test_sequences_with_logits_processors_decode_without_drafts(copy_mtp: Path) -> None:
    """A processor (structured output, thinking budget) sees every emitted token in order: no drafts for it."""
    seen: list[int] = []

    def processor(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(len(output))
        return logits

    engine = make_engine(copy_mtp, 2)
    params = [dataclasses.replace(GREEDY, logits_processors=[processor]), GREEDY]
    outs = engine.generate_all(PROMPTS[1:3], params)
    assert [o.outputs[0].token_ids for o in outs] == reference(copy_mtp)[1:3]
    assert seen == list(range(GREEDY.max_tokens or 0))  # called once per token, in order
    assert engine.stats()["spec_draft_tokens"] > 0  # the other sequence still speculated
