"""Qwen3-Omni video input against transformers 5.24 on a tiny random checkpoint (CPU, float32): the Thinker's
logits and M-RoPE positions for video prompts, with and without the video's audio track interleaved
(`use_audio_in_video`), given the same pixel_values_videos and audio features; the interleaved token layout
against Qwen3OmniMoeProcessor.replace_video_with_audio_token; and bad plans as RequestErrors."""
from __future__ import annotations

import types

import pytest
import torch

from asr_checkpoints import AUDIO_END_ID, AUDIO_START_ID, AUDIO_TOKEN_ID, hf_features
from omni_checkpoints import build_omni_checkpoint, load_hf_omni
from test_qwen3_omni import PATCH_DIM, chat_prompt, clip, image
from vl_checkpoints import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID
from qwenstack.errors import RequestError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.qwen3_omni_moe_plan import group_time_offsets, video_audio_layout
from qwenstack.models.registry import load_model
from qwenstack.multimodal.inputs import AudioPlacement, ImageInput, MultimodalBatch, VideoFrame, first_encoder_row


SECONDS_PER_GRID = 1.0  # temporal_patch_size 2 / fps 2: transformers' video_second_per_grid


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    # the Thinking layout (no Talker, no Code2Wav): the Thinker is all these tests read, and it builds faster
    path = build_omni_checkpoint(tmp_path_factory.mktemp("omni-video"), audio_output=False, seed=4,
                                 with_tokenizer=False)
    return load_model(path, dtype=torch.float32), load_hf_omni(path)


def video(groups: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, list[ImageInput]]:
    """transformers' pixel_values_videos [T*h*w, C*T*P*P] and our per-group inputs of the same rows."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(groups * h * w, PATCH_DIM, generator=g)
    inputs = [ImageInput(rows, (1, h, w), f"video{seed}:{i}", VideoFrame(i, i * SECONDS_PER_GRID))
              for i, rows in enumerate(pixels.split(h * w))]
    return pixels, inputs


def video_tokens(ours, groups: list[ImageInput], audio_tokens: int | None) -> list[int]:
    """The video's span as the processor writes it (the template's vision tokens around it)."""
    per_group = groups[0].num_tokens(ours.merge_size)
    if audio_tokens is None:
        return [VISION_START_ID] + [VIDEO_TOKEN_ID] * per_group * len(groups) + [VISION_END_ID]
    layout = video_audio_layout(group_time_offsets(groups, ours.args.thinker.position_id_per_seconds), audio_tokens)
    body = [t for kind, n in layout for t in ([VIDEO_TOKEN_ID] * n * per_group if kind == "video"
                                               else [AUDIO_TOKEN_ID] * n)]
    return [VISION_START_ID, AUDIO_START_ID] + body + [AUDIO_END_ID, VISION_END_ID]


def multimodal_batch(ours, plan) -> MultimodalBatch:
    """The plan's rows as the engine injects them: each input encoded once, each placement its rows of it."""
    inputs = {(p.audio if isinstance(p, AudioPlacement) else p.image).content_hash: p for p in plan.placements}
    images = [p.image for p in inputs.values() if not isinstance(p, AudioPlacement)]
    audios = [p.audio for p in inputs.values() if isinstance(p, AudioPlacement)]
    encoded = dict(zip([i.content_hash for i in images], ours.encode_images(images) if images else []))
    encoded |= dict(zip([a.content_hash for a in audios], ours.encode_audio(audios) if audios else []))
    rows, embeds, deep = [], [], []
    for p in plan.placements:
        out = encoded[(p.audio if isinstance(p, AudioPlacement) else p.image).content_hash]
        first = first_encoder_row(p)
        rows.append(torch.arange(p.offset, p.end))
        embeds.append(out.embeds[first:first + p.length])
        deep.append(out.deepstack[:, first:first + p.length])
    return MultimodalBatch(torch.cat(rows), torch.cat(embeds), torch.cat(deep, dim=1))


# (groups, merged-grid h and w in patches, seconds of the audio track or None, an image before the video)
CASES = {
    "video": (3, 4, 6, None, False),
    "video+audio, audio outlasts": (2, 4, 4, 2.3, False),  # 30 audio tokens: groups at 0, 25; audio tail last
    "video+audio, video outlasts": (4, 2, 4, 1.2, False),  # 16 audio tokens; groups at 0, 25, 50, 75 last
    "image then video+audio": (2, 4, 4, 1.5, True),
}


@torch.inference_mode()
@pytest.mark.parametrize("case", list(CASES))
def test_thinker_video_logits_and_positions_match_transformers(models, case: str) -> None:
    ours, hf = models
    groups_n, h, w, seconds, with_image = CASES[case]
    pixels, groups = video(groups_n, h, w, seed=groups_n)
    user, hf_kwargs, images, audios = [60, 61], {}, [], []
    if with_image:
        img = image((1, 4, 6), seed=5)
        user += [VISION_START_ID] + [IMAGE_TOKEN_ID] * img.num_tokens(2) + [VISION_END_ID, 62]
        hf_kwargs |= {"pixel_values": img.pixel_values, "image_grid_thw": torch.tensor([img.grid_thw])}
        images.append(img)
    audio_tokens = None
    if seconds is not None:
        samples, track = clip(seconds, seed=6)
        audio_tokens = ours.audio_tokens(track)
        hf_kwargs["input_features"], hf_kwargs["feature_attention_mask"] = hf_features(samples)
        audios.append(track)
    user += video_tokens(ours, groups, audio_tokens) + [63]
    images += groups
    ids = chat_prompt(user)
    input_ids = torch.tensor([ids])
    hf_kwargs |= {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                  "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[groups_n, h, w]]),
                  "video_second_per_grid": torch.tensor([SECONDS_PER_GRID]),
                  "use_audio_in_video": seconds is not None}

    plan = ours.plan_multimodal(ids, images, audios)
    want_pos, want_delta = hf.thinker.model.get_rope_index(
        input_ids, hf_kwargs.get("image_grid_thw"), hf_kwargs["video_grid_thw"], hf_kwargs["attention_mask"],
        seconds is not None, hf_kwargs["feature_attention_mask"].sum(-1) if seconds else None,
        hf_kwargs["video_second_per_grid"])
    assert torch.equal(plan.positions, want_pos[:, 0].long()) and plan.rope_delta == int(want_delta)

    hidden = ours(input_ids[0], plan.positions, AttentionBatch.for_prompts([len(ids)]), None,
                  multimodal=multimodal_batch(ours, plan))
    want = hf.thinker(**hf_kwargs).logits[0]
    assert want.std() > 0.5  # O(1) logits: 1e-4 is a real float32 check
    torch.testing.assert_close(ours.compute_logits(hidden), want, atol=1e-4, rtol=0)


def test_interleaved_layout_matches_the_processor() -> None:
    """Our segments spell the same placeholder text as transformers' replace_video_with_audio_token."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    stub = types.SimpleNamespace(audio_bos_token="<A>", audio_eos_token="</A>", video_token="v", audio_token="a",
                                 video_processor=types.SimpleNamespace(merge_size=2))
    for groups, h, w, audio_tokens, per_second, grid_seconds in [(3, 4, 6, 30, 25, 1.0), (4, 2, 4, 16, 25, 1.0),
                                                                 (5, 2, 2, 40, 13, 2.0), (1, 2, 2, 3, 13, 1.0),
                                                                 (6, 2, 2, 7, 13, 1.0)]:
        want = Qwen3OmniMoeProcessor.replace_video_with_audio_token(
            stub, {"video_grid_thw": torch.tensor([[groups, h, w]]), "video_second_per_grid": [grid_seconds]}, 0,
            {"num_audio_tokens": [audio_tokens]}, 0, position_id_per_seconds=per_second)
        frames = [ImageInput(torch.zeros(h * w, 1), (1, h, w), "x", VideoFrame(i, i * grid_seconds))
                  for i in range(groups)]
        layout = video_audio_layout(group_time_offsets(frames, per_second), audio_tokens)
        got = "".join(("v" * (h * w // 4)) * n if kind == "video" else "a" * n for kind, n in layout)
        assert want == f"<A>{got}</A>", (groups, audio_tokens, per_second)


def test_bad_video_plans_are_request_errors(models) -> None:
    ours, _ = models
    _, groups = video(2, 4, 4)
    samples, track = clip(1.0, seed=1)
    good = chat_prompt(video_tokens(ours, groups, None))
    with pytest.raises(RequestError, match="needs 8 placeholder tokens"):
        ours.plan_multimodal(good[:12] + good[13:], groups, [])
    with pytest.raises(RequestError, match="more video placeholder runs"):
        ours.plan_multimodal(good, [], [])
    with pytest.raises(RequestError, match="placeholders for 0"):
        ours.plan_multimodal(chat_prompt([60]), groups, [])
    interleaved = chat_prompt(video_tokens(ours, groups, ours.audio_tokens(track)))
    swapped = list(interleaved)
    first_audio = swapped.index(AUDIO_TOKEN_ID)
    swapped[first_audio - 1], swapped[first_audio] = AUDIO_TOKEN_ID, VIDEO_TOKEN_ID
    with pytest.raises(RequestError, match="not laid out"):
        ours.plan_multimodal(swapped, groups, [track])
    with pytest.raises(RequestError, match="more audio placeholder runs"):
        ours.plan_multimodal(interleaved, groups, [])
    odd = [ImageInput(g.pixel_values, g.grid_thw, g.content_hash, VideoFrame(i, i * 0.3)) for i, g in enumerate(groups)]
    with pytest.raises(RequestError, match="fractional time position"):
        ours.plan_multimodal(chat_prompt(video_tokens(ours, groups, None)), odd, [])
