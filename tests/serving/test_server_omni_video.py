"""Qwen3-Omni video input through the server with the `openai` SDK: a `video_url` data: URL answered in text,
the same video with its audio track heard (`mm_processor_kwargs.use_audio_in_video`) answered in text and
in speech, and 400s for bad videos, limits and options. The clip is made here with PyAV (8 tiny frames and a
2 s AAC track). Also the Omni frame sampling against transformers' Qwen2VLVideoProcessor.sample_frames (the
processor Qwen3-Omni uses; it needs torchvision to run whole, which does not import beside our torch)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import types
from typing import Any, Iterator

import numpy as np
import openai
import pytest
import torch

from omni_checkpoints import build_native_omni_checkpoint
from server_utils import BackgroundServer
from vl_checkpoints import VIDEO_TOKEN_ID
from asr_checkpoints import AUDIO_TOKEN_ID, speechlike
from qwenstack.audio.decode import decode_audio_track
from qwenstack.engine.engine import EngineConfig
from qwenstack.engine.params import SamplingParams
from qwenstack.models.registry import load_model
from qwenstack.multimodal.inputs import MultimodalInputs
from qwenstack.multimodal.video_processing import (
    OMNI_VIDEO_DEFAULTS, VideoProcessor, VideoProcessorConfig, decode_video, sample_indices,
)
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import ServedModel, build_served_model
from qwenstack.serving.videos import expand_video_placeholders, interleave_video_audio
from qwenstack.tokenizer import Tokenizer


# A small per-frame budget keeps the tiny model's prompts short (Qwen3-Omni's own is 128..768 merged patches).
VIDEO_CONFIG = {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 2048, "longest_edge": 6144},
                "fps": 2, "min_frames": 4, "max_frames": 16, "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
FRAME_S, TAIL_FRAMES = 0.08, 5


def make_clip(num_frames: int, fps: int, audio_seconds: float = 0.0, width: int = 80, height: int = 48,
              seed: int = 0) -> bytes:
    """An MPEG-4 video of random frames, with a mono 16 kHz AAC track of speech-like sound when audio_seconds."""
    import av

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=16000) if audio_seconds else None
        if audio is not None:
            audio.layout = "mono"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None:
            samples = speechlike(audio_seconds, seed=seed).astype(np.float32)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                container.mux(audio.encode(chunk))
            container.mux(audio.encode())
    return buffer.getvalue()


CLIP = make_clip(8, fps=4, audio_seconds=2.0)  # 2 s: 4 frames sampled at 2 fps -> 2 groups; 2 s of sound
SILENT = make_clip(8, fps=4, seed=1)


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    path = build_native_omni_checkpoint(tmp_path_factory.mktemp("omni-video"), seed=8)
    (path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    return build_served_model("omni", load_model(path, dtype=torch.float32), Tokenizer.from_dir(path),
                              EngineConfig(block_size=8, kv_cache_memory=2**24),
                              hf_config=json.loads((path / "config.json").read_text()), model_dir=path)


@pytest.fixture(scope="module")
def server(served: ServedModel) -> Iterator[BackgroundServer]:
    config = ServerConfig(enable_ui=False, max_video_frames=8, max_video_seconds=5, max_video_bytes=200_000,
                          max_videos_per_request=1, speech_seconds_per_token=FRAME_S,
                          speech_tail_seconds=TAIL_FRAMES * FRAME_S, max_speech_seconds=2.0)
    with BackgroundServer(create_app([served], config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def ask(client: openai.OpenAI, content: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(model="omni", messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=6, **kwargs)


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def expected_prompt(served: ServedModel, data: bytes, hear: bool) -> tuple[list[int], MultimodalInputs]:
    """The prompt and inputs built by hand from the library's pieces, as the server should build them."""
    tok = served.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What happens?<|vision_start|><|video_pad|>"
                                                                "<|vision_end|>"}], add_generation_prompt=True)
    groups = served.video_processor(data).groups
    ids = expand_video_placeholders(tok.encode(text), tok, served.hf_config, groups, 2)
    if not hear:
        return ids, MultimodalInputs(groups)
    track = served.asr.clip(decode_audio_track(data).samples)
    ids, audios = interleave_video_audio(ids, tok, served.hf_config, groups, [], [track], served.asr.model)
    return ids, MultimodalInputs(groups, audios)


async def _engine_text(served: ServedModel, ids: list[int], inputs: MultimodalInputs) -> str:
    final = None
    async for out in served.engine.generate(ids, SamplingParams(temperature=0, max_tokens=6), multimodal=inputs):
        final = out
    return final.outputs[0].text


def test_video_url_answers_in_text_as_the_engine(client: openai.OpenAI, served: ServedModel) -> None:
    r = ask(client, [{"type": "text", "text": "What happens?"}, video_part(video_url(CLIP))])
    ids, inputs = expected_prompt(served, CLIP, hear=False)
    # 48x80 frames -> 64x64 (the per-frame budget), 4x4 patches merged 2x2: 4 tokens per group, 2 groups
    assert ids.count(VIDEO_TOKEN_ID) == 8 and AUDIO_TOKEN_ID not in ids
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == asyncio.run(_engine_text(served, ids, inputs))


def test_video_with_its_audio_track_answers_in_text_and_speech(client: openai.OpenAI, served: ServedModel) -> None:
    hear = {"mm_processor_kwargs": {"use_audio_in_video": True}}
    content = [{"type": "text", "text": "What happens?"}, video_part(video_url(CLIP))]
    r = ask(client, content, extra_body=hear)
    ids, inputs = expected_prompt(served, CLIP, hear=True)
    track_tokens = served.asr.model.audio_tokens(inputs.audios[0])
    assert ids.count(AUDIO_TOKEN_ID) == track_tokens > 20 and ids.count(VIDEO_TOKEN_ID) == 8
    plain = ask(client, content)
    assert r.usage.prompt_tokens == len(ids) == plain.usage.prompt_tokens + track_tokens + 2  # + audio start, end
    assert r.choices[0].message.content == asyncio.run(_engine_text(served, ids, inputs))
    # load_audio_from_video (transformers 5.24's name) is the same option
    assert ask(client, content, extra_body={"mm_processor_kwargs": {"load_audio_from_video": True}}
               ).usage.prompt_tokens == len(ids)
    # a silent video heard: its frames alone, as transformers' processor does
    assert ask(client, [video_part(video_url(SILENT))], extra_body=hear).usage.prompt_tokens == (
        ask(client, [video_part(video_url(SILENT))]).usage.prompt_tokens)
    spoken = ask(client, content, extra_body=hear, modalities=["text", "audio"],
                 audio={"voice": "ethan", "format": "pcm16"})
    pcm = base64.b64decode(spoken.choices[0].message.audio.data)
    c2w = served.asr.model.code2wav
    frames, rest = divmod(len(pcm) // 2 + c2w.tail, c2w.samples_per_frame)
    assert rest == 0 and frames == min(6 + TAIL_FRAMES, 25)
    assert spoken.choices[0].message.audio.transcript == r.choices[0].message.content


def test_a_video_past_the_frame_limit_is_answered(client: openai.OpenAI) -> None:
    """10 frames at 2 fps against the server's limit of 8: sampled at 8 over the whole video, not refused."""
    assert ask(client, [video_part(video_url(make_clip(40, fps=8)))]).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("content, extra, message", [
    ([video_part(video_url(make_clip(24, fps=4)))], None, "6.0 s long, over the 5-second limit"),
    ([video_part("data:video/mp4;base64," + base64.b64encode(b"not a video").decode())], None, "could not be decoded"),
    ([video_part(video_url(make_clip(1, fps=4)))], None, "fewer than the temporal patch"),
    ([video_part(video_url(CLIP))], {"mm_processor_kwargs": {"use_audio_in_video": "yes"}}, "must be true or false"),
    ([video_part(video_url(CLIP))], {"mm_processor_kwargs": {"fps": 4}}, "unknown key(s) fps"),
])
def test_bad_videos_and_options_are_400s(client: openai.OpenAI, content: list, extra: Any, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, content, extra_body=extra)
    assert message in info.value.body["message"]


def test_omni_sampling_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # The module imports torchvision at the top for its resize, which sample_frames does not use: stub it for
    # this import only (monkeypatch removes the stubs and the module afterwards).
    name = "transformers.models.qwen2_vl.video_processing_qwen2_vl"
    monkeypatch.delitem(sys.modules, name, raising=False)
    for stub_name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                      "torchvision.transforms.v2.functional"):
        monkeypatch.setitem(sys.modules, stub_name, types.ModuleType(stub_name))
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    config = VideoProcessorConfig.from_dict({k: v for k, v in VIDEO_CONFIG.items() if k != "size"}, OMNI_VIDEO_DEFAULTS)
    assert config.per_frame_budget and config.image.min_pixels == 128 * 32 * 32  # Qwen3OmniMoeProcessor's size
    stub = types.SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=16)
    config = VideoProcessorConfig.from_dict(VIDEO_CONFIG, OMNI_VIDEO_DEFAULTS)
    for total, fps in [(8, 4), (14, 4), (300, 30), (301, 29.97), (100000, 25), (50, 0.5), (5, 30), (9, 2)]:
        want = Qwen2VLVideoProcessor.sample_frames(stub, VideoMetadata(total_num_frames=total, fps=fps), fps=2)
        assert sample_indices(total, fps, config) == want.tolist(), (total, fps)
    decoded = decode_video(CLIP, config)
    assert decoded.indices == [0, 2, 4, 6] and decoded.fps == 4
    # per-frame budget (the image smart_resize), patch layout, and the groups' times (video_second_per_grid)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    processor = VideoProcessor(config)
    for frames, height, width in [(4, 48, 80), (16, 1080, 1920), (2, 33, 33), (8, 20, 700)]:
        assert processor.resized_size(frames, height, width) == smart_resize(height, width, 32, 2048, 6144)
    video = torch.randn(6, 3, 64, 96)
    want, t, h, w = Qwen2VLVideoProcessor.patchify(None, video[None].clone(), 16, 2, 2)
    assert torch.equal(processor._patchify(video), want[0]) and (t, h, w) == (3, 4, 6)
    processed = processor.process_frames(decoded.frames, decoded.indices, decoded.fps)
    assert processed.grid_thw == (2, 4, 4) and [g.video_frame.seconds for g in processed.groups] == [0.0, 1.0]


def test_audio_in_video_needs_a_model_that_hears() -> None:
    from qwenstack.serving.errors import APIError
    from qwenstack.serving.videos import wants_audio_in_video

    request = types.SimpleNamespace(mm_processor_kwargs={"use_audio_in_video": True})
    vl = types.SimpleNamespace(name="vl", hf_config={"model_type": "qwen3_vl"}, asr=None)
    with pytest.raises(APIError) as err:
        wants_audio_in_video(request, vl)
    assert err.value.status == 400 and err.value.param == "mm_processor_kwargs"
    assert not wants_audio_in_video(types.SimpleNamespace(mm_processor_kwargs={"use_audio_in_video": False}), vl)
    assert not wants_audio_in_video(types.SimpleNamespace(mm_processor_kwargs=None), vl)
