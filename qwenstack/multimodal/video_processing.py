"""Video preprocessing for Qwen3-VL: encoded bytes -> sampled frames -> patches per temporal group, with the
timestamps the prompt carries. Configured by the checkpoint's video_preprocessor_config.json.

Decisions:
- Decoding with PyAV (FFmpeg's libraries), as transformers' `pyav` backend reads: total frames and fps from
  the stream header (frames counted by demuxing when the header has none), frames decoded in order up to
  the last sampled one, converted to RGB.
- Sampling, resizing and patching follow transformers' Qwen3VLVideoProcessor step by step: `fps` frames per
  second of video (at least min_frames, at most max_frames and the frame count), indices spread evenly by
  np.linspace(...).round(); the video smart_resize (one size for all frames, the pixel budget over all
  sampled frames); rescale and normalise; the last frame repeated up to a multiple of temporal_patch_size;
  patches in merge-block order per temporal group. transformers resizes with torchvision's antialiased
  bicubic (its video processor needs torchvision); we resize each frame with Pillow's bicubic, as our image
  path does, so pixels can differ by about a grey level.
- Timestamps: per temporal group, the mean time of its first and last frame (index / fps), printed as
  "<{t:.1f} seconds>" before the group's `<|vision_start|><|video_pad|>*N<|vision_end|>`, as
  transformers' Qwen3VLProcessor.replace_video_token writes it.
- Each temporal group enters the engine as one ImageInput of grid (1, h, w): Qwen3-VL's vision tower
  attends within a frame group and positions each group like an image (get_rope_index splits the video
  grid to T=1 groups), so encoding groups separately is the same computation, and the encoder and prefix
  caches work per group.
- Qwen3-Omni's videos follow transformers' Qwen2VLVideoProcessor instead (processor_type), with the size
  Qwen3OmniMoeProcessor passes on every call unless video_preprocessor_config.json sets one: frames taken by
  a float32 stride of total / n from frame 0, n the frames at `fps` floored to whole temporal patches; each
  frame resized by the image smart_resize (a per-frame budget); no timestamps in the prompt, the group's
  time being index x temporal_patch_size / fps (the processor's video_second_per_grid, with the fps we
  sampled at; transformers' processor assumes 1 fps unless one is passed).
- Videos are untrusted input: the byte size is checked before parsing, the duration and frame count from
  the header before decoding, and decoding stops at the last sampled frame. Failures are VideoErrors.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwenstack.errors import RequestError
from qwenstack.multimodal.image_processing import ImageProcessor, ImageProcessorConfig, smart_resize
from qwenstack.multimodal.inputs import ImageInput, VideoFrame

# transformers' Qwen3VLVideoProcessor class defaults (a checkpoint's video_preprocessor_config.json overrides).
VIDEO_DEFAULTS: dict[str, Any] = {"size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
                                  "fps": 2, "min_frames": 4, "max_frames": 768, "max_video_tokens": 768}
# Qwen3-Omni: transformers' Qwen2VLVideoProcessor with the size Qwen3OmniMoeProcessor passes on every call
# (a per-frame budget), sampling at qwen-omni-utils' 2 fps; max_video_tokens is Qwen2VLVideoProcessor's.
QWEN2_VL_STYLE = "Qwen2VLVideoProcessor"
OMNI_VIDEO_DEFAULTS: dict[str, Any] = {"video_processor_type": QWEN2_VL_STYLE,
                                       "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
                                       "fps": 2, "min_frames": 4, "max_frames": 768, "max_video_tokens": 128000}


class VideoError(RequestError):
    """A video that cannot be used: corrupt, without a video stream, or over a limit."""


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 64 * 1024 * 1024  # encoded size
    max_seconds: float = 600.0  # duration from the header
    max_frames: int = 64  # frames sampled (the model sees max_frames / temporal_patch_size groups)
    max_decoded_frames: int = 36_000  # frames decoded to reach the last sample (bounds CPU time)
    # RGB pixels of all sampled frames before resizing (bounds memory: 64 frames of 4K, 1.6 GB). A video of
    # black frames compresses to almost nothing, so the byte limit alone let 22 KB of 4096x2304 use 5 GB.
    max_pixels: int = 64 * 3840 * 2160


@dataclass(frozen=True)
class VideoProcessorConfig:
    image: ImageProcessorConfig  # patch/merge sizes, pixel budget over all sampled frames, normalisation
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False  # transformers 5.24's default (qwen-vl-utils caps; opt in via config)
    max_video_tokens: int = 768
    # Which transformers video processor's rules: Qwen3-VL's (a pixel budget over all frames, linspace
    # sampling, timestamps in the prompt) or Qwen2-VL's, which Qwen3-Omni uses (a per-frame budget, sampling
    # by a fixed stride, the group's time from fps alone).
    processor_type: str = "Qwen3VLVideoProcessor"

    @classmethod
    def from_dict(cls, config: dict[str, Any], defaults: dict[str, Any] = VIDEO_DEFAULTS) -> "VideoProcessorConfig":
        merged = {**defaults, **config}
        image = ImageProcessorConfig.from_dict(merged)
        kind = QWEN2_VL_STYLE if merged.get("video_processor_type") == QWEN2_VL_STYLE else "Qwen3VLVideoProcessor"
        return cls(image, float(merged["fps"]), int(merged["min_frames"]), int(merged["max_frames"]),
                   bool(merged.get("cap_pixels_per_frame") or False), int(merged["max_video_tokens"]), kind)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path,
                        defaults: dict[str, Any] = VIDEO_DEFAULTS) -> "VideoProcessorConfig":
        """video_preprocessor_config.json (or processor_config.json's video_processor, as transformers 5 saves it)
        over `defaults`; without one, the image preprocessor's patch sizes and normalisation with the defaults'
        budget (OMNI_VIDEO_DEFAULTS for Qwen3-Omni)."""
        from qwenstack.config import nested_processor_config, read_json_config, read_processor_config

        model_dir = Path(model_dir)
        nested = nested_processor_config(model_dir, "video_processor")
        if nested is not None:
            return cls.from_dict(nested, defaults)
        if (model_dir / "video_preprocessor_config.json").is_file():
            return cls.from_dict(read_json_config(model_dir, "video_preprocessor_config.json"), defaults)
        base = read_processor_config(model_dir, "image_processor", "preprocessor_config.json")
        return cls.from_dict({k: v for k, v in base.items() if k not in ("size", "min_pixels", "max_pixels")}, defaults)

    @property
    def per_frame_budget(self) -> bool:
        return self.processor_type == QWEN2_VL_STYLE


@dataclass
class DecodedVideo:
    frames: np.ndarray  # [N, H, W, 3] uint8, the sampled frames
    indices: list[int]  # their frame numbers
    fps: float  # of the source video
    total_frames: int


@dataclass
class ProcessedVideo:
    groups: list[ImageInput]  # one per temporal group, grid (1, h, w), in time order
    timestamps: list[float]  # seconds, one per group
    grid_thw: tuple[int, int, int]  # of the whole video (T groups)
    pixel_values: torch.Tensor  # [T*h*w, C*T*P*P], transformers' pixel_values_videos layout

    def tokens_per_group(self, merge_size: int) -> int:
        return self.grid_thw[1] * self.grid_thw[2] // merge_size**2


def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """One (height, width) for every frame: sides multiples of `factor`, t*h*w within the pixel budget."""
    if num_frames < temporal_factor:
        raise VideoError(f"{num_frames} frames sampled, fewer than the temporal patch of {temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"video aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_indices(total_frames: int, video_fps: float, config: VideoProcessorConfig) -> list[int]:
    """Which frames the model sees: `config.fps` per second of video, evenly spread (transformers' rule)."""
    if total_frames < 1:
        raise VideoError("the video has no frames")
    if config.per_frame_budget:
        return _stride_indices(total_frames, video_fps, config)
    fps = video_fps or 24.0  # transformers' fallback when the container names no rate
    num = int(total_frames / fps * config.fps)
    num = min(max(num, config.min_frames), config.max_frames, total_frames)
    return [int(i) for i in np.linspace(0, total_frames - 1, num).round().astype(int)]


def _stride_indices(total_frames: int, video_fps: float, config: VideoProcessorConfig) -> list[int]:
    """Qwen2VLVideoProcessor.sample_frames with fps: a whole number of temporal patches, taken by a fixed
    (float32) stride from frame 0."""
    tp = config.image.temporal_patch_size
    if not video_fps:
        raise VideoError("the video names no frame rate, which sampling at a fixed fps needs")
    max_frames = math.floor(min(config.max_frames, total_frames) / tp) * tp
    num = min(max(total_frames / video_fps * config.fps, config.min_frames), max_frames, total_frames)
    num = math.floor(num / tp) * tp
    if num < tp:
        raise VideoError(f"the video has {total_frames} frame(s), fewer than the temporal patch of {tp}")
    return torch.arange(0, total_frames, total_frames / num).int().tolist()


def group_timestamps(indices: list[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Per temporal group, the mean time of its first and last frame (the last index repeated to fill)."""
    padded = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [i / (video_fps or 24.0) for i in padded]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def decode_video(data: bytes, config: VideoProcessorConfig, limits: VideoLimits = VideoLimits()) -> DecodedVideo:
    """The sampled frames of an encoded video, within the limits."""
    import av

    if len(data) > limits.max_bytes:
        raise VideoError(f"video is {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            total = int(stream.frames or 0)
            if total == 0:  # no count in the header (e.g. WebM): count packets without decoding
                total = sum(1 for p in container.demux(stream) if p.size)
                container.seek(0)
            seconds = total / fps if fps else 0.0
            if seconds > limits.max_seconds:
                raise VideoError(f"video is {seconds:.1f} s long, over the {limits.max_seconds:g}-second limit")
            # The server's frame limit caps the sampling as the model's own max_frames does (frames spread over
            # the whole video; transformers' rule): a long video is seen more sparsely, not refused.
            capped = replace(config, max_frames=min(config.max_frames, limits.max_frames))
            indices = sample_indices(total, fps, capped)
            if indices[-1] >= limits.max_decoded_frames:
                raise VideoError(f"reaching the last sampled frame needs {indices[-1] + 1} decoded frames, over "
                                 f"the limit of {limits.max_decoded_frames}")
            _check_pixels(stream.codec_context.width, stream.codec_context.height, len(indices), limits)
            wanted, frames, size = set(indices), {}, None
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    # A stream may change frame size midway (WebRTC and MediaRecorder recordings, joined clips):
                    # later frames are scaled to the first sampled one's size, which the model's grid is made for.
                    if size is None:
                        size = (frame.width, frame.height)
                        _check_pixels(*size, len(indices), limits)  # the header may understate it
                    frames[i] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                if i >= indices[-1]:
                    break
    except VideoError:
        raise
    except Exception as exc:  # PyAV's errors (InvalidDataError, ...) for a corrupt or unsupported file
        raise VideoError(f"video could not be decoded: {getattr(exc, 'strerror', None) or exc}") from None
    if len(frames) < len(wanted):  # the header promised more frames than the stream holds
        if not frames:
            raise VideoError("the video stream holds no decodable frames")
        indices = [i for i in indices if i in frames]
    return DecodedVideo(np.stack([frames[i] for i in indices]), indices, fps, total)


def _check_pixels(width: int, height: int, frames: int, limits: VideoLimits) -> None:
    if width * height * frames > limits.max_pixels:
        raise VideoError(f"{frames} sampled frames of {width}x{height} are {width * height * frames} pixels, over "
                         f"the limit of {limits.max_pixels}")


class VideoProcessor:
    def __init__(self, config: VideoProcessorConfig, limits: VideoLimits = VideoLimits()) -> None:
        self.config = config
        self.limits = limits
        self._frames = ImageProcessor(config.image)  # normalisation and patch layout, shared with images

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        c = self.config.image
        max_pixels = c.max_pixels
        if self.config.per_frame_budget:  # Qwen2VLVideoProcessor.resize: each frame as an image
            if self.config.cap_pixels_per_frame:
                total = int(self.config.max_video_tokens * c.factor * c.factor * 0.9)
                max_pixels = max(min(max_pixels, total * c.temporal_patch_size // num_frames), int(c.min_pixels * 1.05))
            return smart_resize(height, width, c.factor, c.min_pixels, max_pixels)
        if self.config.cap_pixels_per_frame:
            frame_cap = self.config.max_video_tokens * c.factor * c.factor
            max_pixels = max(min(frame_cap, c.max_pixels // num_frames), int(c.min_pixels * 1.05)) * num_frames
        return video_smart_resize(num_frames, height, width, c.temporal_patch_size, c.factor, c.min_pixels, max_pixels)

    def process_frames(self, frames: np.ndarray, indices: list[int], fps: float,
                       content_hash: str | None = None) -> ProcessedVideo:
        """Sampled RGB frames [N, H, W, 3] uint8 -> patches per temporal group and their timestamps."""
        c = self.config.image
        n, height, width = frames.shape[:3]
        resized_h, resized_w = self.resized_size(n, height, width)
        pixels = np.stack([np.asarray(Image.fromarray(f).resize((resized_w, resized_h), resample=Image.Resampling(c.resample)))
                           if (resized_h, resized_w) != (height, width) else f for f in frames])
        x = (pixels.astype(np.float64) * c.rescale_factor).astype(np.float32) if c.do_rescale else pixels.astype(np.float32)
        if c.do_normalize:
            x = (x - np.asarray(c.image_mean, dtype=np.float32)) / np.asarray(c.image_std, dtype=np.float32)
        video = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # [N, C, H, W]
        pad = -n % c.temporal_patch_size
        if pad:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        patches = self._patchify(video)
        t = video.shape[0] // c.temporal_patch_size
        gh, gw = resized_h // c.patch_size, resized_w // c.patch_size
        digest = content_hash or hashlib.blake2b(patches.numpy().tobytes(), digest_size=16).hexdigest()
        if self.config.per_frame_budget:  # Qwen3OmniMoeProcessor's video_second_per_grid: T / fps per group
            groups = video.shape[0] // c.temporal_patch_size
            times = [g * c.temporal_patch_size / self.config.fps for g in range(groups)]
        else:
            times = group_timestamps(indices, fps, c.temporal_patch_size)
        groups = [ImageInput(rows, (1, gh, gw), f"{digest}:{g}", VideoFrame(g, times[g]))
                  for g, rows in enumerate(patches.split(gh * gw))]
        return ProcessedVideo(groups, times, (t, gh, gw), patches)

    def _patchify(self, video: torch.Tensor) -> torch.Tensor:
        # video: [N, C, H, W] with N a multiple of T -> [N/T * gh*gw, C*T*P*P], per group in merge-block order.
        c = self.config.image
        p, m, tp = c.patch_size, c.merge_size, c.temporal_patch_size
        n, channels, height, width = video.shape
        gh, gw = height // p, width // p
        blocks = video.reshape(n // tp, tp, channels, gh // m, m, p, gw // m, m, p)
        blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, gh/m, gw/m, m, m, C, T, P, P]
        return blocks.reshape(n // tp * gh * gw, channels * tp * p * p)

    def __call__(self, data: bytes) -> ProcessedVideo:
        decoded = decode_video(data, self.config, self.limits)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr(self.config).encode())
        digest.update(data)
        return self.process_frames(decoded.frames, decoded.indices, decoded.fps, digest.hexdigest())

    def with_limits(self, limits: VideoLimits) -> "VideoProcessor":
        return VideoProcessor(replace(self.config), limits)


__all__ = ["OMNI_VIDEO_DEFAULTS",
           "DecodedVideo", "ProcessedVideo", "VideoError", "VideoLimits", "VideoProcessor", "VideoProcessorConfig",
           "decode_video", "group_timestamps", "sample_indices", "video_smart_resize"]
