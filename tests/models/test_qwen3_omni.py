"""Qwen3-Omni-MoE against transformers 5.24 on a tiny random checkpoint (CPU, float32), stage by stage:
Thinker logits for text, audio and image prompts; the Talker's codes and the Code2Wav waveform of the whole
`generate(return_audio=True)` with greedy talker settings; Code2Wav alone; streamed audio equal to the one-shot
decode for several chunkings; and the Thinking/Captioner layout (`enable_audio_output: false`) loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asr_checkpoints import AUDIO_END_ID, AUDIO_START_ID, AUDIO_TOKEN_ID, hf_features, speechlike
from omni_checkpoints import NUM_CODE_GROUPS, CODEBOOK, ROLE_IDS, build_omni_checkpoint, load_hf_omni
from vl_checkpoints import IMAGE_TOKEN_ID, VISION_END_ID, VISION_START_ID
from qwenstack.audio.features import log_mel
from qwenstack.audio.omni_speech import AnswerSpeech, SpeechChunking, SpeechLimits
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration
from qwenstack.models.qwen3_omni_moe_talker import TalkerSampling
from qwenstack.models.registry import load_model
from qwenstack.multimodal.inputs import AudioInput, ImageInput, MultimodalBatch


IM_START, IM_END, NL = 151644, 151645, 198
USER, ASSISTANT = ROLE_IDS["user_token_id"], ROLE_IDS["assistant_token_id"]
PATCH_DIM = 3 * 2 * 16 * 16


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    path = build_omni_checkpoint(tmp_path_factory.mktemp("omni"), seed=3, with_tokenizer=False)
    return load_model(path, dtype=torch.float32), load_hf_omni(path)


def clip(seconds: float, seed: int = 0) -> tuple[np.ndarray, AudioInput]:
    samples = speechlike(seconds, seed=seed)
    return samples, AudioInput.from_features(log_mel(samples), seconds)


def image(grid: tuple[int, int, int], seed: int = 0) -> ImageInput:
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return ImageInput.from_pixels(torch.randn(t * h * w, PATCH_DIM, generator=g), grid)


def chat_prompt(user: list[int]) -> list[int]:
    return [IM_START, ROLE_IDS["system_token_id"], NL, 50, 51, IM_END, NL, IM_START, USER, NL, *user, IM_END, NL, IM_START, ASSISTANT, NL]


def omni_inputs(ours: Qwen3OmniMoeForConditionalGeneration, audio: tuple[np.ndarray, AudioInput] | None,
                img: ImageInput | None) -> tuple[list[int], dict, list, list]:
    """A chat prompt with an optional image then an optional clip, and transformers' inputs for it."""
    user, hf, images, audios = [60, 61], {}, [], []
    if img is not None:
        user += [VISION_START_ID] + [IMAGE_TOKEN_ID] * img.num_tokens(ours.merge_size) + [VISION_END_ID, 62]
        hf["pixel_values"], hf["image_grid_thw"] = img.pixel_values, torch.tensor([img.grid_thw])
        images.append(img)
    if audio is not None:
        samples, a = audio
        user += [AUDIO_START_ID] + [AUDIO_TOKEN_ID] * ours.audio_tokens(a) + [AUDIO_END_ID, 63]
        hf["input_features"], hf["feature_attention_mask"] = hf_features(samples)
        audios.append(a)
    ids = chat_prompt(user)
    hf["input_ids"] = torch.tensor([ids])
    hf["attention_mask"] = torch.ones(1, len(ids), dtype=torch.long)
    return ids, hf, images, audios


def multimodal_batch(ours, plan) -> MultimodalBatch | None:
    if not plan.placements:
        return None
    images = [p.image for p in plan.placements if hasattr(p, "image")]
    audios = [p.audio for p in plan.placements if hasattr(p, "audio")]
    enc_i, enc_a = iter(ours.encode_images(images) if images else []), iter(ours.encode_audio(audios) if audios else [])
    rows, embeds, deep = [], [], []
    for p in plan.placements:
        out = next(enc_a) if hasattr(p, "audio") else next(enc_i)
        rows.append(torch.arange(p.offset, p.end))
        embeds.append(out.embeds)
        deep.append(out.deepstack)
    return MultimodalBatch(torch.cat(rows), torch.cat(embeds), torch.cat(deep, dim=1))


CASES = {"text": (None, None), "audio": (2.3, None), "image": (None, (1, 4, 6)), "image+audio": (1.1, (1, 6, 4))}


@torch.inference_mode()
@pytest.mark.parametrize("case", sorted(CASES))
def test_thinker_logits_match_transformers(models, case: str) -> None:
    ours, hf = models
    seconds, grid = CASES[case]
    ids, hf_kwargs, images, audios = omni_inputs(ours, clip(seconds, seed=2) if seconds else None,
                                                 image(grid, seed=5) if grid else None)
    plan = ours.plan_multimodal(ids, images, audios)
    hidden = ours(torch.tensor(ids), plan.positions, AttentionBatch.for_prompts([len(ids)]), None,
                  multimodal=multimodal_batch(ours, plan))
    want = hf.thinker(**hf_kwargs).logits[0]
    assert want.std() > 0.5  # O(1) logits: 1e-4 is a real float32 check
    torch.testing.assert_close(ours.compute_logits(hidden), want, atol=1e-4, rtol=0)
    if grid is not None:  # the rope delta of generated tokens equals transformers'
        hf_pos, delta = hf.thinker.model.get_rope_index(hf_kwargs["input_ids"], hf_kwargs["image_grid_thw"], None,
                                                        hf_kwargs["attention_mask"], False,
                                                        hf_kwargs.get("feature_attention_mask", torch.ones(1, 1)).sum(-1),
                                                        None)
        assert plan.rope_delta == int(delta) and torch.equal(plan.positions, hf_pos[:, 0].long())


@torch.inference_mode()
def test_code2wav_matches_transformers_and_streams_exactly(models) -> None:
    ours, hf = models
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, CODEBOOK, (1, NUM_CODE_GROUPS, 30), generator=g)
    want = hf.code2wav.chunked_decode(codes, chunk_size=300, left_context_size=25)[0, 0]
    got = ours.code2wav.decode(codes[0].T)
    assert want.abs().max() > 0.05 and got.shape == want.shape == (30 * 1920 - ours.code2wav.tail,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for sizes in ([1] * 30, [4] * 7 + [2], [25, 5], [1, 4, 25], [2, 28]):
        stream = ours.code2wav.stream()
        parts, start = [], 0
        for n in sizes:
            parts.append(stream.push(codes[0, :, start:start + n].T))
            start += n
        torch.testing.assert_close(torch.cat(parts), got, atol=1e-5, rtol=0, msg=f"chunks {sizes}")


def _hf_generate(hf, hf_kwargs: dict, thinker_tokens: int, talker_tokens: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """transformers' whole pipeline, greedy; returns the answer ids, the talker codes [G, T] and the waveform."""
    captured = {}
    decode = hf.code2wav.chunked_decode

    def spy(codes, **kw):
        captured["codes"] = codes[0].clone()
        return decode(codes, **kw)

    hf.code2wav.chunked_decode = spy
    try:
        ids, wav = hf.generate(**hf_kwargs, speaker="Ethan", thinker_max_new_tokens=thinker_tokens,
                               thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=talker_tokens)
    finally:
        hf.code2wav.chunked_decode = decode
    prompt_len = hf_kwargs["input_ids"].shape[1]
    return ids[0, prompt_len:].tolist(), captured["codes"], wav[0, 0]


@torch.inference_mode()
# "image" exercises the Talker's hidden_projection rows and its own M-RoPE positions. Audio prompts cannot be
# compared: transformers 5.24's Talker get_rope_index reads config.audio_config, which its Talker config lacks
# (AttributeError), so its generate(return_audio=True) fails on any prompt with audio.
@pytest.mark.parametrize("case", ["text", pytest.param("image", marks=pytest.mark.slow)])
def test_generate_with_audio_matches_transformers(models, case: str) -> None:
    """Thinker tokens, Talker codes (given the Thinker's outputs) and the waveform of transformers'
    generate(return_audio=True) with greedy talker settings, reproduced by the streaming speech path."""
    ours, hf = models
    seconds, grid = CASES[case]
    ids, hf_kwargs, images, audios = omni_inputs(ours, clip(seconds, seed=2) if seconds else None,
                                                 image(grid, seed=5) if grid else None)
    answer, want_codes, want_wav = _hf_generate(hf, hf_kwargs, thinker_tokens=8, talker_tokens=14)
    plan = ours.plan_multimodal(ids, images, audios) if images or audios else None
    speech = AnswerSpeech(ours, ids, plan, "ethan", eos_token_ids=[IM_END],
                          sampling=TalkerSampling(temperature=0.0, max_frames=13), chunking=SpeechChunking(1, 4))
    parts = [speech.feed([t]) for t in answer]
    parts.append(speech.finish())
    assert torch.equal(speech.codes.T, want_codes)
    wav = torch.cat(parts)
    assert wav.shape == want_wav.shape
    torch.testing.assert_close(wav, want_wav, atol=1e-5, rtol=0)
    # audio came out before the answer's last token was known
    assert sum(p.numel() for p in parts[:-2]) > 0


def test_speech_limits_end_a_talker_that_never_says_eos(models) -> None:
    """The random Talker never emits its EOS; the limits end it: frames_per_token per spoken token (the end
    token is not spoken) plus the tail once the text is complete, and max_frames even while it is written."""
    ours, _ = models
    ids = chat_prompt([60, 61])
    greedy = TalkerSampling(temperature=0.0)
    speech = AnswerSpeech(ours, ids, None, "ethan", [IM_END], sampling=greedy,
                          limits=SpeechLimits(frames_per_token=2, tail_frames=3))
    samples = [speech.feed([70, 71]), speech.feed([72, IM_END])]
    assert speech.finish_reason is None  # the text is complete only once finish() says so
    samples.append(speech.finish())
    assert speech.finish_reason == "length" and speech.codes.shape[0] == 2 * 3 + 3
    c2w = ours.code2wav
    assert sum(s.numel() for s in samples) == 9 * c2w.samples_per_frame - c2w.tail
    capped = AnswerSpeech(ours, ids, None, "ethan", [IM_END], sampling=TalkerSampling(temperature=0.0, max_frames=2),
                          limits=SpeechLimits())
    capped.feed([70, 71, 72, 73, 74, 75])
    assert capped.finish_reason == "length" and capped.codes.shape[0] == 2  # cut before the text ended
    with pytest.raises(ValueError):
        SpeechLimits(frames_per_token=0.5)


def test_text_prompt_speech_runs_no_thinker_layer(models) -> None:
    """A text-only prompt's Talker reads only input embeddings: the speech path must not rerun Thinker layers."""
    ours, _ = models
    calls = []
    hook = ours.thinker.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        speech = AnswerSpeech(ours, chat_prompt([60, 61]), None, "ethan", [IM_END],
                              sampling=TalkerSampling(temperature=0.0, max_frames=3))
        speech.feed([70, 71, 72])
        speech.finish()
    finally:
        hook.remove()
    assert speech.codes.shape[0] == 3 and calls == []


def test_thinking_variant_loads_text_only(tmp_path: Path) -> None:
    """enable_audio_output: false (Thinking/Captioner): no Talker, no Code2Wav, only thinker.* tensors."""
    path = build_omni_checkpoint(tmp_path / "thinking", audio_output=False, seed=7, with_tokenizer=False)
    ours = load_model(path, dtype=torch.float32)
    assert not ours.has_talker and not hasattr(ours, "talker") and not hasattr(ours, "code2wav")
    hf = load_hf_omni(path)
    ids = chat_prompt([60, 61, 62])
    with torch.inference_mode():
        got = ours.compute_logits(ours(torch.tensor(ids), torch.arange(len(ids)),
                                       AttentionBatch.for_prompts([len(ids)]), None))
        want = hf.thinker(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no Talker"):
        AnswerSpeech(ours, ids, None, "ethan", [IM_END])


def test_sanitize_is_idempotent() -> None:
    names = ["thinker.audio_tower.proj1.weight", "thinker.visual.merger_list.1.ln_q.bias",
             "thinker.visual.merger.mlp.2.weight", "thinker.model.layers.0.mlp.gate.weight"]
    once = [Qwen3OmniMoeForConditionalGeneration.sanitize(n) for n in names]
    assert once == ["thinker.audio_projector.linear_1.weight", "thinker.visual.deepstack_merger_list.1.norm.bias",
                    "thinker.visual.merger.linear_fc2.weight", "thinker.model.layers.0.mlp.gate.weight"]
    assert [Qwen3OmniMoeForConditionalGeneration.sanitize(n) for n in once] == once
