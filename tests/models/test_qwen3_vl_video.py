"""Qwen3-VL video: decoding (PyAV), frame sampling, resizing, patching and the timestamped prompt against
transformers' own functions; the model against transformers' Qwen3-VL given the same pixel_values_videos;
`video_url` parts through the server (openai SDK) and LLM.chat; limits and bad input as 400s. Also LLM.chat
with image parts (the server's parts and loader): the same tokens as the engine given the hand-built prompt.
One tiny checkpoint, loaded once, serves every test here (the LLM and the server share its weights).

transformers' Qwen3VLVideoProcessor needs torchvision to run, which does not import beside our torch build
(reference notes), so the processor is compared step by step with the functions it is made of:
`read_video_pyav` (decoding), `Qwen3VLVideoProcessor.sample_frames`, `smart_resize`, `patchify`, and
`Qwen3VLProcessor.replace_video_token` (timestamps and prompt text). The one step not compared is the frame
resize itself: transformers uses torchvision's antialiased bicubic, we use Pillow's bicubic.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import openai
import pytest
import torch

from server_utils import BackgroundServer, tiny_served_model
from vl_checkpoints import (
    IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, build_vl_checkpoint, data_url, load_hf_vl, noise_image, png_bytes,
)
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.llm import LLM
from qwenstack.multimodal.inputs import MultimodalInputs, images_from_processed
from qwenstack.multimodal.video_processing import (
    VideoError, VideoLimits, VideoProcessor, VideoProcessorConfig, decode_video, sample_indices, video_smart_resize,
)
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import ServedModel


VIDEO_CONFIG = {"size": {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 24}, "fps": 2, "min_frames": 4,
                "max_frames": 16, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "video_processor_type": "Qwen3VLVideoProcessor"}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make_video(num_frames: int, fps: int, width: int = 80, height: int = 48, seed: int = 0) -> bytes:
    """An MPEG-4 clip of random frames (lossy, but decoding is deterministic)."""
    import av

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


CLIP = make_video(14, fps=4)  # 3.5 s at 4 fps: 7 frames sampled at 2 fps -> 4 temporal groups (last repeated)


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_vl_checkpoint(tmp_path_factory.mktemp("vl-video"), "dense", tie=False, seed=7, with_tokenizer=True)
    (path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    return path


@pytest.fixture(scope="module")
def llm(vl_path: Path) -> LLM:
    return LLM(vl_path, dtype=torch.float32, device="cpu", kv_cache_memory=2**23, block_size=4)


@pytest.fixture(scope="module")
def served(llm: LLM, vl_path: Path) -> ServedModel:
    from qwenstack.engine.engine import EngineConfig
    from qwenstack.serving.served import build_served_model

    return build_served_model("vl", llm.loaded.model, llm.tokenizer, EngineConfig(block_size=4, kv_cache_memory=2**23),
                              hf_config=llm.loaded.config, model_dir=vl_path)


@pytest.fixture(scope="module")
def processor(vl_path: Path) -> VideoProcessor:
    return VideoProcessor(VideoProcessorConfig.from_pretrained(vl_path))


def hf_sampler(config: dict[str, Any]) -> Any:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    stub = SimpleNamespace(fps=config["fps"], min_frames=config["min_frames"], max_frames=config["max_frames"])
    return lambda metadata, **kwargs: Qwen3VLVideoProcessor.sample_frames(stub, metadata)


def test_decoding_and_sampling_match_transformers(processor: VideoProcessor, tmp_path: Path) -> None:
    from transformers.video_utils import VideoMetadata, read_video_pyav

    path = tmp_path / "clip.mp4"
    path.write_bytes(CLIP)
    want_frames, metadata = read_video_pyav(str(path), hf_sampler(VIDEO_CONFIG))
    got = decode_video(CLIP, processor.config)
    assert got.indices == [int(i) for i in metadata.frames_indices] == [0, 2, 4, 6, 9, 11, 13]
    assert got.fps == metadata.fps == 4 and got.total_frames == 14
    np.testing.assert_array_equal(got.frames, want_frames)
    config = VideoProcessorConfig.from_dict({**VIDEO_CONFIG, "max_frames": 768})
    for total, fps in [(1, 30), (3, 30), (10, 30), (300, 30), (301, 29.97), (100000, 25), (50, 0.5)]:
        want = hf_sampler({**VIDEO_CONFIG, "max_frames": 768})(VideoMetadata(total_num_frames=total, fps=fps))
        assert sample_indices(total, fps, config) == [int(i) for i in want], (total, fps)


def test_resize_patches_and_prompt_match_transformers(processor: VideoProcessor, served: ServedModel) -> None:
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
    from transformers.video_utils import VideoMetadata

    for frames, height, width in [(4, 48, 80), (7, 1080, 1920), (16, 20, 700), (2, 33, 33), (768, 480, 640)]:
        for budget in [(32 * 32 * 2, 32 * 32 * 24), (128 * 32 * 32, 32 * 32 * 768)]:
            want = smart_resize(frames, height, width, 2, 32, *budget)
            assert video_smart_resize(frames, height, width, 2, 32, *budget) == want
    video = torch.randn(6, 3, 64, 96)
    want, t, h, w = Qwen3VLVideoProcessor.patchify(None, video[None].clone(), 16, 2, 2)
    assert torch.equal(processor._patchify(video), want[0]) and (t, h, w) == (3, 4, 6)

    decoded = decode_video(CLIP, processor.config)
    processed = processor.process_frames(decoded.frames, decoded.indices, decoded.fps)
    assert processed.grid_thw == (4, 2, 4) and len(processed.groups) == 4  # 48x80 -> 32x64 (the budget)
    # The prompt: transformers' replace_video_token text for the same grid and frame indices.
    stub = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                           video_token="<|video_pad|>")
    stub._calculate_timestamps = functools.partial(Qwen3VLProcessor._calculate_timestamps, stub)
    metadata = VideoMetadata(total_num_frames=14, fps=4.0, frames_indices=np.array(decoded.indices))
    text = Qwen3VLProcessor.replace_video_token(stub, {"video_grid_thw": torch.tensor([processed.grid_thw]),
                                                       "video_metadata": [metadata]}, 0)
    assert text.startswith("<0.2 seconds><|vision_start|>") and "<3.2 seconds>" in text
    from qwenstack.serving.videos import expand_video_placeholders

    tok = served.tokenizer
    template = "Watch <|vision_start|><|video_pad|><|vision_end|> now"
    got = expand_video_placeholders(tok.encode(template), tok, served.hf_config, processed.groups, 2)
    assert got == tok.encode(template.replace("<|video_pad|>", text))


# A longer, larger clip: 30 frames at 8 fps (3.75 s) of 160x96 -> 8 frames sampled, a bigger grid per group.
LARGER_CLIP = make_video(30, fps=8, width=160, height=96, seed=3)


@torch.inference_mode()
@pytest.mark.parametrize("clip", [CLIP, pytest.param(LARGER_CLIP, marks=pytest.mark.slow)], ids=["small", "larger"])
def test_model_matches_transformers_on_video(served: ServedModel, processor: VideoProcessor, vl_path: Path,
                                             clip: bytes) -> None:
    from qwenstack.serving.videos import expand_video_placeholders

    processed = processor(clip)
    tok = served.tokenizer
    prompt = tok.encode("<|im_start|>user\nWhat happens <|vision_start|><|video_pad|><|vision_end|>?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = expand_video_placeholders(prompt, tok, served.hf_config, processed.groups, 2)
    hf = load_hf_vl(vl_path)
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == VIDEO_TOKEN_ID).int() * 2,
              "pixel_values_videos": processed.pixel_values, "video_grid_thw": torch.tensor([processed.grid_thw])}
    want = hf.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(ids):].tolist()
    engine = served.engine.engine
    got = engine.generate_all([ids], [GREEDY], [MultimodalInputs(processed.groups)])[0].outputs[0].token_ids
    assert got == want


@pytest.fixture(scope="module")
def server(served: ServedModel, tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(enable_ui=False, max_video_frames=8, max_video_seconds=5, max_video_bytes=200_000,
                          max_videos_per_request=1)
    with BackgroundServer(create_app([served, tiny_served_model(tiny_qwen3)], config)) as srv:
        yield srv


def ask(srv: BackgroundServer, content: list[dict[str, Any]], model: str = "vl") -> Any:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=8, extra_body=NO_THINK)


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def test_video_url_through_the_server_answers_as_the_engine(server: BackgroundServer, served: ServedModel,
                                                            processor: VideoProcessor) -> None:
    from qwenstack.serving.videos import expand_video_placeholders

    r = ask(server, [{"type": "text", "text": "What happens?"}, video_part(video_url(CLIP))])
    tok = served.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What happens?<|vision_start|><|video_pad|>"
                                                                  "<|vision_end|>"}], enable_thinking=False)
    processed = processor(CLIP)
    ids = expand_video_placeholders(tok.encode(prompt), tok, served.hf_config, processed.groups, 2)
    assert r.usage.prompt_tokens == len(ids) and ids.count(VIDEO_TOKEN_ID) == 4 * 2
    want = asyncio.run(_engine_text(served, ids, processed.groups))
    assert r.choices[0].message.content == want


async def _engine_text(served: ServedModel, ids: list[int], groups: list) -> str:
    final = None
    async for out in served.engine.generate(ids, SamplingParams(temperature=0, max_tokens=8),
                                            multimodal=MultimodalInputs(groups)):
        final = out
    return final.outputs[0].text


def joined_clips(sizes: list[tuple[int, int]], frames_each: int = 6) -> bytes:
    """MPEG-TS segments of different frame sizes, byte-joined: one stream whose frame size changes midway, as
    WebRTC / MediaRecorder recordings and concatenated clips are."""
    import av

    out = b""
    for k, (width, height) in enumerate(sizes):
        rng, buffer = np.random.default_rng(k), io.BytesIO()
        with av.open(buffer, "w", format="mpegts") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for _ in range(frames_each):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())
        out += buffer.getvalue()
    return out


def test_a_stream_that_changes_frame_size_is_read(server: BackgroundServer, processor: VideoProcessor) -> None:
    """Stacking frames of two sizes raised a bare ValueError: the server answered 500."""
    data = joined_clips([(80, 48), (64, 32)])
    decoded = decode_video(data, processor.config)
    assert decoded.frames.shape[1:] == (48, 80, 3) and len(decoded.indices) == 6
    assert processor(data).grid_thw == (3, 4, 4)
    r = ask(server, [{"type": "text", "text": "What happens?"}, video_part(video_url(data))])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_local_video_paths_where_the_serve_flag_allows_them(llm: LLM, vl_path: Path, tmp_path: Path) -> None:
    import dataclasses

    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import serve_config_from_args, server_config
    from qwenstack.engine.engine import EngineConfig
    from qwenstack.serving.served import build_served_model

    # Its own engine: this app shuts its models down when it stops, and the module's server still serves `served`
    # (which used to hang there afterwards: see test_a_shut_down_engine_refuses_at_once).
    served = build_served_model("vl", llm.loaded.model, llm.tokenizer, EngineConfig(block_size=4,
                                kv_cache_memory=2**23), hf_config=llm.loaded.config, model_dir=vl_path)

    args = build_parser(discover_commands()[0]).parse_args(["serve", "--allow-local-image-paths", "--no-ui"])
    config = dataclasses.replace(server_config(serve_config_from_args(args)), max_video_frames=8, max_video_seconds=5,
                                 max_video_bytes=200_000, max_videos_per_request=1)
    assert config.allow_local_image_paths
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(CLIP)
    with BackgroundServer(create_app([served], config)) as srv:
        from_disk = ask(srv, [{"type": "text", "text": "What happens?"}, video_part(clip.as_uri())])
        inline = ask(srv, [{"type": "text", "text": "What happens?"}, video_part(video_url(CLIP))])
        assert from_disk.choices[0].message.content == inline.choices[0].message.content
        assert from_disk.usage.prompt_tokens == inline.usage.prompt_tokens
        for url, message in [((tmp_path / "missing.mp4").as_uri(), "missing.mp4"),
                             ("file:relative/clip.mp4", "absolute path")]:
            with pytest.raises(openai.BadRequestError) as info:
                ask(srv, [video_part(url)])
            assert message in info.value.body["message"]


@pytest.mark.parametrize("content, message", [
    ([video_part(video_url(make_video(40, fps=4)))], "10.0 s long, over the 5-second limit"),
    ([video_part(video_url(make_video(8, fps=4, width=640, height=480)))], "video is larger than the 200000-byte limit"),
    ([video_part("data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode())], "could not be decoded"),
    ([video_part("file:///tmp/clip.mp4")], "file:// video URLs are not allowed on this server"),
    ([video_part(video_url(CLIP)), video_part(video_url(CLIP))], "2 videos, more than this server's limit of 1"),
])
def test_video_limits_and_bad_input_are_400s(server: BackgroundServer, content: list, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(server, content)
    assert message in info.value.body["message"]


def test_a_video_past_the_frame_limit_is_seen_more_sparsely(server: BackgroundServer) -> None:
    """9 frames at 2 fps against the server's limit of 8: the 8 it may take are spread over the whole video (as
    the model's own max_frames caps them), where it used to be refused; so it costs what an 8-frame one does."""
    longer = ask(server, [video_part(video_url(make_video(36, fps=8)))])
    assert longer.usage.prompt_tokens == ask(server, [video_part(video_url(make_video(32, fps=8)))]).usage.prompt_tokens


def test_text_only_model_refuses_video(server: BackgroundServer) -> None:
    with pytest.raises(openai.BadRequestError, match="does not accept video_url"):
        ask(server, [video_part(video_url(CLIP))], model="tiny")


def test_decoder_limits_directly(processor: VideoProcessor) -> None:
    with pytest.raises(VideoError, match="byte limit"):
        decode_video(CLIP, processor.config, VideoLimits(max_bytes=100))
    # decoded pixels: a clip of black 4K frames is a few KB but decodes to gigabytes (7 frames of 80x48 here)
    assert len(decode_video(CLIP, processor.config, VideoLimits(max_pixels=7 * 80 * 48)).indices) == 7
    with pytest.raises(VideoError, match="7 sampled frames of 80x48 are 26880 pixels, over the limit of 26879"):
        decode_video(CLIP, processor.config, VideoLimits(max_pixels=7 * 80 * 48 - 1))
    with pytest.raises(VideoError, match="no video stream|could not be decoded"):
        decode_video(b"\x00" * 64, processor.config)


def test_llm_chat_takes_video_as_the_server_does(llm: LLM, served: ServedModel, processor: VideoProcessor,
                                                 tmp_path: Path) -> None:
    from qwenstack.serving.videos import expand_video_placeholders

    path = tmp_path / "clip.mp4"
    path.write_bytes(CLIP)
    content = [{"type": "text", "text": "What happens?"}, video_part(str(path))]  # a local path is fine here
    out = llm.chat([{"role": "user", "content": content}], GREEDY, enable_thinking=False)[0]
    tok = llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What happens?<|vision_start|><|video_pad|>"
                                                                  "<|vision_end|>"}], enable_thinking=False)
    processed = processor(CLIP)
    ids = expand_video_placeholders(tok.encode(prompt), tok, served.hf_config, processed.groups, 2)
    want = llm.engine.generate_all([ids], [GREEDY], [MultimodalInputs(processed.groups)])[0]
    assert out.prompt_token_ids == ids and out.outputs[0].token_ids == want.outputs[0].token_ids


IMAGE_A, IMAGE_B = noise_image(70, 50, seed=1), noise_image(90, 120, seed=2)


def test_llm_chat_with_images_matches_the_engine(llm: LLM, tmp_path: Path) -> None:
    file_b = tmp_path / "b.png"
    file_b.write_bytes(png_bytes(IMAGE_B))
    content = [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}},
               {"type": "image_url", "image_url": {"url": str(file_b)}}, {"type": "text", "text": " please."}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY, enable_thinking=False)[0]

    tok = llm.tokenizer
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Compare {placeholder * 2} please."}],
                                     enable_thinking=False)
    from qwenstack.serving.images import image_processor_for

    processed = image_processor_for(llm.loaded.config, llm.loaded.path)([png_bytes(IMAGE_A), png_bytes(IMAGE_B)])
    counts = iter(processed.num_image_tokens)
    expanded: list[int] = []
    for t in tok.encode(prompt):
        expanded += [IMAGE_TOKEN_ID] * next(counts) if t == IMAGE_TOKEN_ID else [t]
    want = llm.engine.generate_all([expanded], [GREEDY], [MultimodalInputs(images_from_processed(processed))])[0]
    assert out.prompt_token_ids == expanded and len(expanded) > 16
    assert out.outputs[0].token_ids == want.outputs[0].token_ids
    assert llm.chat([{"role": "user", "content": "Hi"}], GREEDY, enable_thinking=False)[0].outputs[0].token_ids


def test_llm_chat_bad_media_are_request_errors(llm: LLM) -> None:
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[0\]"):
        llm.chat(bad, GREEDY)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(RequestError, match="remote"):
        llm.chat(remote, GREEDY)
    with pytest.raises(RequestError, match="could not be decoded"):
        llm.chat([{"role": "user", "content": [video_part("data:video/mp4;base64,AAAA")]}], GREEDY)
