"""OpenAI-style `video_url` content parts (vLLM's and Ollama's extension) -> Qwen3-VL video inputs.

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
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from qwenstack.multimodal.image_processing import ImageError, decode_data_url
from qwenstack.multimodal.inputs import ImageInput
from qwenstack.multimodal.video_processing import VideoError, VideoLimits, VideoProcessor, VideoProcessorConfig
from qwenstack.serving.errors import bad_request


def video_processor_for(hf_config: dict[str, Any], model_dir: Any) -> VideoProcessor | None:
    if "vision_config" not in hf_config or model_dir is None or hf_config.get("video_token_id") is None:
        return None
    return VideoProcessor(VideoProcessorConfig.from_pretrained(model_dir))


def placeholder_text(tokenizer: Any, hf_config: dict[str, Any]) -> str:
    return "".join(tokenizer.id_to_token(hf_config[k]) for k in ("vision_start_token_id", "video_token_id",
                                                                  "vision_end_token_id"))


async def load_video(ref: Any, processor: VideoProcessor, config: Any,
                     read_file: Callable[[Any, Any], Awaitable[bytes]]) -> list[ImageInput]:
    """A video part -> its temporal groups. Raises APIError 400 naming the part. `read_file` reads a file://
    part under the server's path rules (serving/images.py's read_image_bytes, passed in by its caller)."""
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
    except (VideoError, ImageError) as exc:
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
    video_id = hf_config.get("video_token_id")
    if video_id is None:  # served without video (Qwen3-Omni, serving_config): no placeholder to expand
        return prompt_ids
    start, end = hf_config["vision_start_token_id"], hf_config["vision_end_token_id"]
    videos: list[list[ImageInput]] = []
    for item in items:
        if item.video_frame is not None:
            if item.video_frame.index == 0:
                videos.append([])
            videos[-1].append(item)
    if prompt_ids.count(video_id) != len(videos):
        raise bad_request("the message text contains video placeholder tokens; send videos as video_url parts",
                          param="messages", code="invalid_video")
    out: list[int] = []
    groups = iter(videos)
    for token in prompt_ids:
        if token != video_id:
            out.append(token)
            continue
        for group in next(groups):
            n = group.num_tokens(merge_size)
            out += tokenizer.encode(f"<{group.video_frame.seconds:.1f} seconds>") + [start] + [video_id] * n + [end]
    return out
