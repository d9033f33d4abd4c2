"""OpenAI-style `video_url` content parts (vLLM's and Ollama's extension) -> Qwen3-VL and Qwen3-Omni video inputs.

Decisions:
- Sources as for images: `data:video/...;base64` URLs always, `file://` paths only where the server allows
  local paths (the same switch as images), never remote URLs. Limits (bytes, seconds, sampled frames,
  videos per request) are checked before the expensive work; every refusal is a 400 naming the part.
- The chat template sees `<|vision_start|><|video_pad|><|vision_end|>` per video (what Qwen3-VL's template
  renders); after tokenizing, each `<|video_pad|>` becomes the per-group text transformers' processor writes,
  "<t seconds><|vision_start|><|video_pad|>*N<|vision_end|>" per temporal group (so the template's own
  vision tokens stay around it, as there). The timestamp text sits between special tokens, so tokenizing it
  alone gives the ids it has in the full text.
- A video's temporal groups join the request's image list in prompt order (multimodal/video_processing.py).
- Qwen3-Omni: frames sampled and sized as its processor does (Qwen2VLVideoProcessor's rules), and each
  `<|video_pad|>` becomes the video's tokens with no timestamps, as Qwen3OmniMoeProcessor writes it. With
  `mm_processor_kwargs: {"use_audio_in_video": true}` (vLLM's spelling of transformers' processor argument;
  `load_audio_from_video`, its 5.24 name, is accepted too) each video's audio track is decoded from the
  same bytes and interleaved with its frame groups (`interleave_video_audio`, after the request's own audio
  parts are expanded); a video without an audio stream keeps its frames alone, as in transformers.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from qwenstack.audio.decode import AudioError
from qwenstack.multimodal.image_processing import ImageError, decode_data_url
from qwenstack.multimodal.inputs import AudioInput, ImageInput
from qwenstack.multimodal.video_processing import (
    OMNI_VIDEO_DEFAULTS, VideoError, VideoLimits, VideoProcessor, VideoProcessorConfig,
)
from qwenstack.serving.errors import bad_request

AUDIO_IN_VIDEO_KEYS = ("use_audio_in_video", "load_audio_from_video")


def is_omni(hf_config: dict[str, Any]) -> bool:
    return hf_config.get("model_type") == "qwen3_omni_moe"


def video_processor_for(hf_config: dict[str, Any], model_dir: Any) -> VideoProcessor | None:
    if "vision_config" not in hf_config or model_dir is None or hf_config.get("video_token_id") is None:
        return None
    if is_omni(hf_config):
        return VideoProcessor(VideoProcessorConfig.from_pretrained(model_dir, OMNI_VIDEO_DEFAULTS))
    return VideoProcessor(VideoProcessorConfig.from_pretrained(model_dir))


def wants_audio_in_video(request: Any, served: Any) -> bool:
    """The request's `mm_processor_kwargs.use_audio_in_video`; 400s for other keys, a non-bool, or a model
    that cannot hear."""
    kwargs = getattr(request, "mm_processor_kwargs", None) or {}
    unknown = sorted(set(kwargs) - set(AUDIO_IN_VIDEO_KEYS))
    if unknown:
        raise bad_request(f"mm_processor_kwargs: unknown key(s) {', '.join(unknown)} (supported: "
                          f"{', '.join(AUDIO_IN_VIDEO_KEYS)})", param="mm_processor_kwargs")
    values = [kwargs[k] for k in AUDIO_IN_VIDEO_KEYS if k in kwargs]
    if any(not isinstance(v, bool) for v in values):
        raise bad_request("mm_processor_kwargs.use_audio_in_video must be true or false",
                          param="mm_processor_kwargs")
    wanted = any(values)
    if wanted and (not is_omni(served.hf_config) or served.asr is None):
        raise bad_request(f"the model '{served.name}' cannot hear a video's audio track (use_audio_in_video is "
                          "for Qwen3-Omni models)", param="mm_processor_kwargs", code="unsupported_content")
    return wanted


def placeholder_text(tokenizer: Any, hf_config: dict[str, Any]) -> str:
    return "".join(tokenizer.id_to_token(hf_config[k]) for k in ("vision_start_token_id", "video_token_id",
                                                                  "vision_end_token_id"))


async def load_video(ref: Any, processor: VideoProcessor, config: Any,
                     read_file: Callable[[Any, Any], Awaitable[bytes]], audio_tracks: list | None = None
                     ) -> list[ImageInput]:
    """A video part -> its temporal groups. Raises APIError 400 naming the part. `read_file` reads a file://
    part under the server's path rules (serving/images.py's read_image_bytes, passed in by its caller).
    audio_tracks: when given, the video's audio track (DecodedAudio, or None for a silent video) is appended."""
    limits = VideoLimits(max_bytes=config.max_video_bytes, max_seconds=config.max_video_seconds,
                         max_frames=config.max_video_frames)
    try:
        url = ref.url.strip()
        if url.lower().startswith("data:"):
            data = decode_data_url(url, limits.max_bytes, kind="video")
        elif url.lower().startswith("file:"):
            data = await read_file(ref, _VideoSource(config))
        else:
            raise VideoError("video_url.url must be a data:video/...;base64 URL"
                             + (" or a file:// path" if config.allow_local_image_paths else ""))
        processed = await asyncio.to_thread(processor.with_limits(limits), data)
        if audio_tracks is not None:
            from qwenstack.audio.decode import decode_audio_track
            from qwenstack.serving.audio import audio_limits

            audio_tracks.append(await asyncio.to_thread(decode_audio_track, data, audio_limits(config)))
    except (VideoError, ImageError, AudioError) as exc:
        raise bad_request(f"{ref.where}: {str(exc).replace('image URL', 'video URL')}", param=ref.param,
                          code="invalid_video") from None
    return processed.groups


class _VideoSource:
    """The server's path rules with the video byte limit (read_image_bytes reads these fields)."""

    def __init__(self, config: Any) -> None:
        self.allow_local_image_paths = config.allow_local_image_paths
        self.allow_remote_image_urls = False
        self.max_image_bytes = config.max_video_bytes


def expand_video_placeholders(prompt_ids: list[int], tokenizer: Any, hf_config: dict[str, Any],
                              items: list[ImageInput], merge_size: int) -> list[int]:
    """Each single `<|video_pad|>` -> its video's timestamped groups; `items` are the request's images and
    video groups in prompt order."""
    from qwenstack.models.qwen3_omni_moe_plan import split_videos

    video_id = hf_config.get("video_token_id")
    if video_id is None:  # served without video: no placeholder to expand
        return prompt_ids
    start, end = hf_config["vision_start_token_id"], hf_config["vision_end_token_id"]
    videos = split_videos(items)[1]
    if prompt_ids.count(video_id) != len(videos):
        raise bad_request("the message text contains video placeholder tokens; send videos as video_url parts",
                          param="messages", code="invalid_video")
    out: list[int] = []
    groups = iter(videos)
    for token in prompt_ids:
        if token != video_id:
            out.append(token)
            continue
        if is_omni(hf_config):  # Qwen3OmniMoeProcessor: the video's tokens alone, no timestamps
            video = next(groups)
            out += [video_id] * sum(g.num_tokens(merge_size) for g in video)
            continue
        for group in next(groups):
            n = group.num_tokens(merge_size)
            out += tokenizer.encode(f"<{group.video_frame.seconds:.1f} seconds>") + [start] + [video_id] * n + [end]
    return out


def interleave_video_audio(prompt_ids: list[int], tokenizer: Any, hf_config: dict[str, Any],
                           items: list[ImageInput], audios: list[AudioInput], tracks: list[AudioInput | None],
                           model: Any) -> tuple[list[int], list[AudioInput]]:
    """Qwen3-Omni's audio in video, after the prompt's videos and audio parts are expanded: each video with a
    track (tracks[i], None for a silent one) becomes `<|audio_start|>` + its groups and track tokens
    interleaved + `<|audio_end|>` (inside the template's vision tokens); returns the prompt and the request's
    clips in prompt order (the tracks among the audio parts)."""
    from qwenstack.models.qwen3_omni_moe_plan import group_time_offsets, split_videos, video_audio_layout

    video_id, audio_id = hf_config["video_token_id"], hf_config["audio_token_id"]
    audio_start, audio_end = tokenizer.token_to_id("<|audio_start|>"), tokenizer.token_to_id("<|audio_end|>")
    per_second = model.args.thinker.position_id_per_seconds
    videos = iter(zip(split_videos(items)[1], tracks))
    parts = iter(audios)
    out: list[int] = []
    ordered: list[AudioInput] = []
    i = 0
    while i < len(prompt_ids):
        token = prompt_ids[i]
        run = i
        while run < len(prompt_ids) and prompt_ids[run] == token:
            run += 1
        if token == audio_id:
            ordered.append(next(parts))  # an audio part, expanded already
        if token != video_id:
            out += prompt_ids[i:run]
            i = run
            continue
        groups, track = next(videos)
        i = run
        if track is None:
            out += [video_id] * sum(g.num_tokens(model.merge_size) for g in groups)
            continue
        per_group = groups[0].num_tokens(model.merge_size)
        out.append(audio_start)
        for kind, count in video_audio_layout(group_time_offsets(groups, per_second), model.audio_tokens(track)):
            out += [video_id] * (count * per_group) if kind == "video" else [audio_id] * count
        out.append(audio_end)
        ordered.append(track)
    return out, ordered


async def attach_video_tracks(plan: Any) -> None:
    """A chat plan whose videos' audio tracks were decoded (plan.video_tracks): the tracks become clips and
    interleave with their videos; the clips of the request end up in prompt order."""
    if not plan.video_tracks or not any(t is not None for t in plan.video_tracks):
        return
    from qwenstack.multimodal.inputs import MultimodalInputs

    served = plan.served
    prompter = served.asr
    clips = [None if t is None else await asyncio.to_thread(prompter.clip, t.samples) for t in plan.video_tracks]
    model = prompter.model
    ids, audios = interleave_video_audio(plan.prompt_ids, served.tokenizer, served.hf_config, plan.multimodal.images,
                                         plan.multimodal.audios, clips, model)
    plan.prompt_ids = ids
    plan.multimodal = MultimodalInputs(images=list(plan.multimodal.images), audios=audios)
