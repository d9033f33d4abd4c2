"""Qwen3Guard-Stream, native: strict loading of the published layout (backbone under model.*, heads at the
top level, no lm_head), per-token verdicts equal whether fed at once or token by token (and equal to a
forward with no cache), and the crafted checkpoint that flags one token."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guard_checkpoints import RESPONSE_CATEGORIES, build_flagging_stream, build_random_stream
from qwenstack.errors import CheckpointError, ConfigError
from qwenstack.guard.verdict import Safety
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.qwen3_guard_stream import GuardStream, TokenVerdict, load_stream_model

HEADS = ["risk_level_category_pre.weight", "risk_level_category_layernorm.weight", "risk_level_head.weight",
         "category_head.weight"]
USER_TEXT = "<|im_start|>user\nThe quick brown fox jumps over the lazy dog. Is Paris the capital of France?<|im_end|>\n"
ANSWER_TEXT = ("<|im_start|>assistant\n<think>\n\n</think>\n\nTo be, or not to be, that is the question: whether "
               "'tis nobler in the mind to suffer. Pack my box with five dozen liquor jugs.")


@pytest.fixture(scope="module")
def random_stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_stream(tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="module")
def guard(random_stream: Path) -> GuardStream:
    return GuardStream.load(random_stream, dtype=torch.float32)


def test_published_layout(random_stream: Path) -> None:
    names = set(load_file(random_stream / "model.safetensors"))
    assert {h for h in HEADS} | {"query_" + h for h in HEADS} <= names
    assert "model.embed_tokens.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith("lm_head") for n in names)
    assert all(n.startswith("model.") or n in HEADS or n.removeprefix("query_") in HEADS for n in names)
    config = json.loads((random_stream / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForGuardModel"] and config["model_type"] == "qwen3"


def test_config_labels(guard: GuardStream) -> None:
    args = guard.model.args
    assert args.risk_levels == ("Safe", "Unsafe", "Controversial") == args.query_risk_levels
    assert args.categories == tuple(RESPONSE_CATEGORIES) and args.query_categories[-1] == "Jailbreak"


def _rewrite(src: Path, dst: Path, edit: dict) -> Path:
    dst.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    state = load_file(src / "model.safetensors")
    for name, value in edit.items():
        if value is None:
            state.pop(name)
        else:
            state[name] = value
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_strict_loading(random_stream: Path, tmp_path: Path) -> None:
    missing = _rewrite(random_stream, tmp_path / "missing", {"query_category_head.weight": None})
    with pytest.raises(CheckpointError, match="query_category_head.weight"):
        load_stream_model(missing)
    extra = _rewrite(random_stream, tmp_path / "extra", {"score.weight": torch.zeros(3, 64)})
    with pytest.raises(CheckpointError, match="score.weight"):
        load_stream_model(extra)
    wrong = _rewrite(random_stream, tmp_path / "wrong", {"risk_level_head.weight": torch.zeros(4, 32)})
    with pytest.raises(CheckpointError, match="risk_level_head.weight"):
        load_stream_model(wrong)
    # A tied lm_head copy (as tie_word_embeddings checkpoints may carry) is expected and unused.
    embed = load_file(random_stream / "model.safetensors")["model.embed_tokens.weight"]
    tied = _rewrite(random_stream, tmp_path / "tied", {"lm_head.weight": embed})
    assert not hasattr(load_stream_model(tied), "lm_head")


def test_config_errors(random_stream: Path, tmp_path: Path) -> None:
    bad = _rewrite(random_stream, tmp_path / "bad", {})
    config = json.loads((bad / "config.json").read_text())
    config["num_category"] = 5
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="response_category_map"):
        load_stream_model(bad)
    for key in ("guard_inner_size", "architectures"):
        config.pop(key)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not a Qwen3Guard-Stream"):
        load_stream_model(bad)


def _close(a: list[TokenVerdict], b: list[TokenVerdict]) -> None:
    assert [(v.token_id, v.position, v.role) for v in a] == [(v.token_id, v.position, v.role) for v in b]
    assert [(v.safety, v.category) for v in a] == [(v.safety, v.category) for v in b]
    torch.testing.assert_close(torch.tensor([v.risk_probs for v in a]), torch.tensor([v.risk_probs for v in b]),
                               atol=1e-5, rtol=1e-5)


def test_at_once_equals_token_by_token(guard: GuardStream) -> None:
    user = guard.tokenizer.encode(USER_TEXT)
    answer = guard.tokenizer.encode(ANSWER_TEXT)
    assert len(user) + len(answer) > 4 * guard.block_size  # the session's cache grows past its first size
    with guard.new_session() as once:
        at_once = once.feed_user(user) + once.feed_assistant(answer)
    with guard.new_session() as step:
        stepped = [v for t in user for v in step.feed_user([t])]
        stepped += step.feed_assistant(torch.tensor(answer[0]))  # a 0-dim tensor is one token
        stepped += [v for i in range(1, len(answer), 3) for v in step.feed_assistant(answer[i:i + 3])]
    _close(at_once, stepped)
    # Every level shows up, so the equality is not trivially all-Safe.
    assert {v.safety for v in at_once} == {Safety.SAFE, Safety.UNSAFE, Safety.CONTROVERSIAL}
    assert all(v.category is None for v in at_once if v.safety is Safety.SAFE)


def test_session_matches_a_forward_without_cache(guard: GuardStream) -> None:
    user = guard.tokenizer.encode(USER_TEXT)
    answer = guard.tokenizer.encode(ANSWER_TEXT)
    ids = torch.tensor(user + answer)
    with torch.inference_mode():
        hidden = guard.model(ids, torch.arange(len(ids)), AttentionBatch.for_prompts([len(ids)]), None)
        user_risk, _ = guard.model.classify(hidden[: len(user)], "user")
        answer_risk, _ = guard.model.classify(hidden[len(user):], "assistant")
    with guard.new_session() as session:
        got = [v.risk_probs for v in session.feed_user(user)] + [v.risk_probs for v in session.feed_assistant(answer)]
    want = torch.cat([user_risk.softmax(-1), answer_risk.softmax(-1)])
    torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-5)


def test_session_limits(guard: GuardStream) -> None:
    session = guard.new_session()
    assert session.feed_user([]) == []
    with pytest.raises(ValueError, match="context"):
        session.feed_user([1] * (guard.max_len + 1))
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.feed_assistant([1])
    with pytest.raises(ValueError, match="role"):
        guard.model.classify(torch.zeros(1, guard.model.args.hidden_size), "system")


def test_flagging_checkpoint(tmp_path: Path) -> None:
    path = build_flagging_stream(tmp_path / "flag", flagged=[7, 9], category="PII")
    guard = GuardStream.load(path, dtype=torch.float32)
    with guard.new_session() as session:
        verdicts = session.feed_user([5, 6, 8] * 40) + session.feed_user([7, 6]) + session.feed_assistant([3] * 300)
    assert {v.safety for v in verdicts[:120]} == {Safety.SAFE} and {v.category for v in verdicts[:120]} == {None}
    assert {v.safety for v in verdicts[120:]} == {Safety.UNSAFE}  # from the flagged token on, however far
    assert {v.category for v in verdicts[120:]} == {"PII"}
    assert min(v.safety_prob for v in verdicts) > 0.99
    assert verdicts[120].verdict().categories == ("PII",) and verdicts[120].verdict().score > 0.99
