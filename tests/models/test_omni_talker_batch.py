"""Qwen3-Omni's Talker as a batched stage: several spoken answers advance together in one Talker forward (the
Qwen3-TTS speech loop: paged KV, code predictor once per step, per-request seeded sampling), each giving the
audio it gives alone, greedy and seeded; answers whose text is late sit out steps; a closed answer frees its
KV blocks at once."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from omni_checkpoints import ROLE_IDS
from qwenstack.audio.omni_speech import AnswerSpeech, SpeechChunking, answer_request, talker_stage
from qwenstack.models.qwen3_omni_moe_talker import TalkerSampling
from qwenstack.models.registry import load_model
from qwenstack.tts.engine import SpeechEngine

IM_START, IM_END, NL = 151644, 151645, 198
ANSWERS = {"a": [70, 71, 72, 73, 74], "b": [80, 81, 82], "c": [90, 91, 92, 93, 94, 95, 96]}
FRAMES = 9  # the random Talker never says EOS: every answer ends at its frame limit


@pytest.fixture(scope="module")
def model(native_omni):
    return load_model(native_omni, dtype=torch.float32)


def prompt(user: list[int]) -> list[int]:
    return [IM_START, ROLE_IDS["user_token_id"], NL, *user, IM_END, NL, IM_START, ROLE_IDS["assistant_token_id"], NL]


def sampling(seed: int | None) -> TalkerSampling:
    return TalkerSampling(temperature=0.0, max_frames=FRAMES) if seed is None else \
        TalkerSampling(temperature=0.9, seed=seed, max_frames=FRAMES)


def _run(model, names: list[str], seeds: dict[str, int | None],
         first_index: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """The named answers (complete texts; answer k has user turn [60 + first_index + k, 61]) through one
    SpeechEngine: audio per answer, and the largest batch a step decoded."""
    engine = SpeechEngine(model, model.code2wav, kv_blocks=64, block_size=4)
    requests = [answer_request(model, name, prompt([60 + first_index + i, 61]), None, "ethan", ANSWERS[name],
                               [IM_END], sampling(seeds[name]), SpeechChunking(1, 3), text_done=True)
                for i, name in enumerate(names)]
    out = engine.generate(requests)
    assert all(out[name][-1].finished for name in names)
    assert engine.blocks.num_free_blocks == 64  # every finished answer gave its blocks back
    return {name: torch.cat([c.samples for c in out[name]]) for name in names}, engine.largest_batch


@pytest.mark.parametrize("seeds", [{"a": None, "b": None, "c": None}, {"a": 1, "b": 2, "c": 3}],
                         ids=["greedy", "seeded"])
def test_three_answers_in_one_batch_equal_each_alone(model, seeds: dict[str, int | None]) -> None:
    together, largest = _run(model, ["a", "b", "c"], seeds)
    assert largest == 3  # all three decoded in the same Talker forwards
    c2w = model.code2wav
    for i, name in enumerate("abc"):
        alone, _ = _run(model, [name], seeds, first_index=i)
        assert together[name].numel() == FRAMES * c2w.samples_per_frame - c2w.tail
        torch.testing.assert_close(together[name], alone[name], atol=1e-5, rtol=0)
    assert not torch.allclose(together["a"], together["b"])


def _speak(model, stage, index: int, name: str, seed: int | None, out: dict) -> None:
    speech = AnswerSpeech(model, prompt([60 + index, 61]), None, "ethan", [IM_END], sampling=sampling(seed),
                          chunking=SpeechChunking(1, 3), stage=stage)
    parts = [speech.feed([t]) for t in ANSWERS[name]]  # token by token, as the Thinker writes them
    parts.append(speech.finish())
    out[name] = (torch.cat(parts), speech.finish_reason)


def test_concurrent_answers_through_the_shared_stage(model) -> None:
    """Three answers fed token by token from three threads share one speech stage (one Talker thread) and
    each gets the audio it gets alone; closing an answer mid-way frees its KV blocks."""
    seeds = {"a": 4, "b": None, "c": 6}
    alone: dict = {}
    for i, name in enumerate("abc"):
        _speak(model, None, i, name, seeds[name], alone)
    stage = talker_stage(model, kv_positions=512, block_size=8)
    together: dict = {}
    threads = [threading.Thread(target=_speak, args=(model, stage, i, name, seeds[name], together))
               for i, name in enumerate("abc")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for name in "abc":
        assert together[name][1] == "length"
        torch.testing.assert_close(together[name][0], alone[name][0], atol=1e-5, rtol=0)
    engine = stage.engine
    total = engine.blocks.num_blocks
    assert engine.blocks.num_free_blocks == total

    # a cancelled answer: its Talker has started and holds blocks, then the request goes away
    speech = AnswerSpeech(model, prompt([60, 61]), None, "ethan", [IM_END], sampling=sampling(None), stage=stage)
    assert speech.feed([70, 71, 72]).numel() > 0
    assert engine.blocks.num_free_blocks < total and len(engine.running) == 1
    speech.close()
    deadline = time.monotonic() + 10
    while (engine.running or engine.blocks.num_free_blocks < total) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.running and not engine.waiting and engine.blocks.num_free_blocks == total
    assert speech.feed([73]).numel() == 0 and speech.finish().numel() == 0  # a closed answer says nothing more
