"""Qwen3-Next against transformers on tiny random checkpoints, and its per-sequence state interface.

Parity: logits for a packed batch of prompts (some longer than the 64-token delta-rule chunk), greedy tokens
through the paged KV cache plus state slots. Interface: chunked prefill continuing from a slot equals one
pass, a pass mixing decode / fresh prefill / continuation equals each sequence alone, a reused slot's stale
contents never leak into a fresh sequence. Loading: a missing tensor is named, mtp.* is ignored.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_hf_checkpoint, load_hf, next_config
from qwenstack.errors import CheckpointError, ConfigError
from qwenstack.engine.reference import allocate_kv_caches, greedy_generate, layer_caches
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import prompt_logits
from qwenstack.models.qwen3_next import LinearAttentionState, Qwen3NextArgs
from qwenstack.models.registry import load_model


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [random_prompt(70, 1), random_prompt(5, 2), [42], random_prompt(130, 3)]
# Our own paths against each other (pieces vs one pass, packed vs alone): the same math, but matrix
# products over different row counts and a shifted 64-token chunk grid round differently; the tiny random
# model amplifies a last-bit difference to about 2e-5 in the logits.
SELF_ATOL = 5e-5


def assert_states_close(got: list[tuple[torch.Tensor, torch.Tensor]], want: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for (conv, rec), (conv_want, rec_want) in zip(got, want):
        torch.testing.assert_close(conv, conv_want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rec, rec_want, atol=1e-5, rtol=1e-4)

CASES = {
    # linear|full alternating, Hv = 2 Hk, Dk != Dv, all layers MoE with a shared expert, untied
    "interval2-grouped": next_config(),
    # explicit layer_types starting with full attention, a dense MLP layer, Hv = Hk, tied, attention bias
    "layer-types-dense-tied": next_config(
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        mlp_only_layers=[1], linear_num_value_heads=2, tie_word_embeddings=True, attention_bias=True,
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp(request.param), "qwen3_next", CASES[request.param],
                               seed=1, with_tokenizer=False)


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("next"), "qwen3_next", next_config(), seed=2,
                               with_tokenizer=False)


def packed_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    lens = [len(p) for p in prompts]
    return list(model.compute_logits(model.forward(ids, positions, AttentionBatch(lens, lens), None)).split(lens))


class SlotRunner:
    """A minimal engine: sequence i owns state slot i and a contiguous run of KV blocks."""

    def __init__(self, model: torch.nn.Module, num_slots: int, max_len: int, block_size: int = 4) -> None:
        self.model, self.block_size = model, block_size
        per_seq = -(-max_len // block_size)
        kv = allocate_kv_caches(model, num_slots * per_seq, block_size, torch.float32)
        self.states = model.make_state_cache(num_slots, torch.float32, "cpu")
        self.caches = layer_caches(kv, self.states)
        self.tables = torch.arange(num_slots * per_seq).view(num_slots, per_seq)

    @torch.inference_mode()
    def step(self, work: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """work: (slot, new tokens, tokens already processed). Logits [len, V] for each entry."""
        ids, positions, kv_slots = [], [], []
        for slot, tokens, start in work:
            for j, token in enumerate(tokens):
                pos = start + j
                ids.append(token)
                positions.append(pos)
                kv_slots.append(int(self.tables[slot, pos // self.block_size]) * self.block_size + pos % self.block_size)
        slots = [w[0] for w in work]
        batch = AttentionBatch(
            [len(w[1]) for w in work], [w[2] + len(w[1]) for w in work], torch.tensor(kv_slots),
            self.tables[slots], self.block_size, state_slots=torch.tensor(slots),
        )
        hidden = self.model.forward(torch.tensor(ids), torch.tensor(positions), batch, self.caches)
        return list(self.model.compute_logits(hidden).split(batch.query_lens))

    def state_of(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(s.conv_state[slot].clone(), s.recurrent_state[slot].clone()) for s in self.states if s is not None]


# --- parity with transformers -------------------------------------------------------------------


@torch.inference_mode()
def test_logits_match_transformers(checkpoint: Path) -> None:
    ours, ref = load_model(checkpoint, dtype=torch.float32), load_hf(checkpoint)
    for prompt, got in zip(PROMPTS, packed_logits(ours, PROMPTS)):
        want = ref(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_greedy_tokens_match_transformers_generate(checkpoint: Path) -> None:
    ours, ref = load_model(checkpoint, dtype=torch.float32), load_hf(checkpoint)
    new_tokens = 64
    got = greedy_generate(ours, PROMPTS, new_tokens, block_size=4)
    for prompt, tokens in zip(PROMPTS, got):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


def test_greedy_slots_follow_sequences_that_stop_early(next_checkpoint: Path) -> None:
    """After one sequence hits eos, the rest decode with a subset of the slots and must not notice."""
    model = load_model(next_checkpoint, dtype=torch.float32)
    prompts = PROMPTS[:3]
    full = greedy_generate(model, prompts, 12, block_size=4)
    eos = full[0][3]  # the first sequence stops after 4 tokens
    early = greedy_generate(model, prompts, 12, block_size=4, eos_token_ids=(eos,))
    assert early[0] == full[0][:4]
    for tokens, reference in zip(early[1:], full[1:]):
        cut = reference.index(eos) + 1 if eos in reference else len(reference)
        assert tokens == reference[:cut]


@torch.inference_mode()
def test_bfloat16_close_to_transformers(next_checkpoint: Path) -> None:
    ours, ref = load_model(next_checkpoint, dtype=torch.bfloat16), load_hf(next_checkpoint, dtype=torch.bfloat16)
    prompt = PROMPTS[0]
    got = packed_logits(ours, [prompt])[0].float()
    want = ref(torch.tensor([prompt])).logits[0].float()
    assert (got - want).abs().max().item() < 0.15


# --- the state interface ------------------------------------------------------------------------


@pytest.mark.parametrize("split", [37, 64, 100])
def test_chunked_prefill_continues_from_state(next_checkpoint: Path, split: int) -> None:
    model = load_model(next_checkpoint, dtype=torch.float32)
    prompt = PROMPTS[3]  # 130 tokens: the pieces cross the 64-token chunk boundary
    whole = SlotRunner(model, 1, 160)
    want = whole.step([(0, prompt, 0)])[0]
    pieces = SlotRunner(model, 1, 160)
    first = pieces.step([(0, prompt[:split], 0)])[0]
    second = pieces.step([(0, prompt[split:], split)])[0]
    torch.testing.assert_close(torch.cat([first, second]), want, atol=SELF_ATOL, rtol=0)
    assert_states_close(pieces.state_of(0), whole.state_of(0))
    # and decoding on from either state gives the same next logits
    token = int(want[-1].argmax())
    torch.testing.assert_close(pieces.step([(0, [token], 130)])[0], whole.step([(0, [token], 130)])[0],
                               atol=SELF_ATOL, rtol=0)


def test_mixed_pass_equals_each_sequence_alone(next_checkpoint: Path) -> None:
    """One pass holding a decode step, a fresh prompt and a chunked-prefill continuation."""
    model = load_model(next_checkpoint, dtype=torch.float32)
    decode_prompt, fresh_prompt, long_prompt = PROMPTS[0], PROMPTS[1], PROMPTS[3]
    alone = SlotRunner(model, 3, 160)
    alone.step([(0, decode_prompt, 0)])
    want_decode = alone.step([(0, [7], 70)])[0]
    want_fresh = alone.step([(1, fresh_prompt, 0)])[0]
    alone.step([(2, long_prompt[:50], 0)])
    want_rest = alone.step([(2, long_prompt[50:], 50)])[0]

    mixed = SlotRunner(model, 3, 160)
    mixed.step([(0, decode_prompt, 0), (2, long_prompt[:50], 0)])
    # slot 1 held another sequence before: stale (even non-finite) contents must not leak into a fresh one
    for state in mixed.states:
        if state is not None:
            state.conv_state[1].fill_(float("nan"))
            state.recurrent_state[1].fill_(float("inf"))
    got_decode, got_fresh, got_rest = mixed.step([(0, [7], 70), (1, fresh_prompt, 0), (2, long_prompt[50:], 50)])
    torch.testing.assert_close(got_decode, want_decode, atol=SELF_ATOL, rtol=0)
    torch.testing.assert_close(got_fresh, want_fresh, atol=SELF_ATOL, rtol=0)
    torch.testing.assert_close(got_rest, want_rest, atol=SELF_ATOL, rtol=0)
    for slot in range(3):
        assert_states_close(mixed.state_of(slot), alone.state_of(slot))


def test_decode_with_a_fresh_one_token_prompt_in_the_pass(next_checkpoint: Path) -> None:
    """All query lengths 1 (the recurrent form), one of them a brand-new single-token prompt."""
    model = load_model(next_checkpoint, dtype=torch.float32)
    runner = SlotRunner(model, 2, 16)
    runner.step([(0, [5, 6, 7], 0)])
    for state in runner.states:
        if state is not None:
            state.recurrent_state[1].fill_(float("nan"))
    got = runner.step([(0, [8], 3), (1, [42], 0)])
    ours = packed_logits(model, [[5, 6, 7, 8], [42]])
    torch.testing.assert_close(got[0][0], ours[0][-1], atol=SELF_ATOL, rtol=0)
    torch.testing.assert_close(got[1][0], ours[1][0], atol=SELF_ATOL, rtol=0)


@torch.inference_mode()
def test_no_cache_paths(next_checkpoint: Path) -> None:
    model = load_model(next_checkpoint, dtype=torch.float32)
    prompts = torch.tensor([PROMPTS[0][:9], PROMPTS[3][:9]])
    logits = prompt_logits(model, prompts)
    torch.testing.assert_close(logits[1], packed_logits(model, [PROMPTS[3][:9]])[0], atol=SELF_ATOL, rtol=0)
    continuing = AttentionBatch([1], [5])
    with pytest.raises(ValueError, match="state"):
        model.forward(torch.tensor([3]), torch.tensor([4]), continuing, None)


def test_cache_layout_and_sizes(next_checkpoint: Path) -> None:
    model = load_model(next_checkpoint, dtype=torch.float32)
    spec = model.kv_cache_spec()
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 16)  # attention layers only
    states = model.make_state_cache(3, torch.bfloat16, "cpu")
    assert [s is None for s in states] == [False, True, False, True]
    state = states[0]
    assert isinstance(state, LinearAttentionState)
    assert state.conv_state.shape == (3, 2 * 2 * 8 + 4 * 12, 3) and state.conv_state.dtype == torch.bfloat16
    assert state.recurrent_state.shape == (3, 4, 8, 12) and state.recurrent_state.dtype == torch.float32
    nbytes = sum(s.conv_state[0].nbytes + s.recurrent_state[0].nbytes for s in states if s is not None)
    assert model.state_bytes_per_slot(torch.bfloat16) == nbytes
    kv = allocate_kv_caches(model, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="one entry per layer"):
        model.forward(torch.tensor([1]), torch.tensor([0]), AttentionBatch([1], [1], state_slots=torch.tensor([0])), kv)
    swapped = list(reversed(layer_caches(kv, model.make_state_cache(1, torch.float32, "cpu"))))
    with pytest.raises(TypeError, match="LinearAttentionState"):
        model.forward(torch.tensor([1]), torch.tensor([0]), AttentionBatch([1], [1], state_slots=torch.tensor([0])),
                      swapped)


# --- config and checkpoint ----------------------------------------------------------------------


def test_layer_pattern_from_full_attention_interval() -> None:
    config = {**next_config(), "model_type": "qwen3_next", "num_hidden_layers": 8, "full_attention_interval": 4}
    args = Qwen3NextArgs.from_dict(config)
    assert args.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
    assert args.rope.partial_rotary_factor == 0.25
    del config["full_attention_interval"]
    with pytest.raises(ConfigError, match="full_attention_interval"):
        Qwen3NextArgs.from_dict(config)
    config = {**next_config(), "layer_types": ["linear_attention"] * 4, "rope_parameters": {"rope_theta": 1e4}}
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        Qwen3NextArgs.from_dict(config)
    config["rope_parameters"] = {"rope_theta": 1e4, "partial_rotary_factor": 0.5}
    assert Qwen3NextArgs.from_dict(config).rope.partial_rotary_factor == 0.5


def _rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(next_checkpoint: Path, tmp_path: Path) -> None:
    name = "model.layers.2.linear_attn.A_log"
    path = _rewrite_checkpoint(next_checkpoint, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(path)


def test_mtp_tensors_are_ignored(next_checkpoint: Path, tmp_path: Path) -> None:
    def add_mtp(tensors: dict[str, torch.Tensor]) -> None:
        tensors["mtp.fc.weight"] = torch.zeros(64, 128)
        tensors["mtp.layers.0.self_attn.q_proj.weight"] = torch.zeros(128, 64)

    path = _rewrite_checkpoint(next_checkpoint, tmp_path / "mtp", add_mtp)
    model = load_model(path, dtype=torch.float32)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3_next"
    assert not any(name.startswith("mtp") for name, _ in model.named_parameters())
