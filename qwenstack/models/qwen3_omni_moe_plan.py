"""Where Qwen3-Omni's Thinker puts images, audio clips and videos in a prompt, and its M-RoPE positions
(transformers 5.24's Qwen3OmniMoe get_rope_index, and its processor's video-with-audio token layout).

Decisions:
- Text advances by one position per token; an audio clip is text-like (one position per placeholder); an
  image of merged grid (h, w) at running position p gives (p, p + row, p + col) and the next token
  p + max(h, w); after any item the next position is the item's largest position + 1.
- A video is one run of `<|video_pad|>` holding its temporal groups in time order; each group enters as an
  ImageInput whose `video_frame.seconds` is the group's start on the processor's clock (index x
  temporal_patch_size / fps, transformers' video_second_per_grid). Group g sits at (s + tau_g, s + row,
  s + col), s the video's first position and tau_g = seconds x position_id_per_seconds. transformers
  computes that product in float; a non-integer one would give fractional positions, which the engine's
  integer positions cannot hold, so it is refused (RequestError) rather than rounded.
- Audio in video (transformers' `use_audio_in_video` / `load_audio_from_video`): the span is
  `<|vision_start|><|audio_start|>` + the video's groups and its audio track's tokens interleaved +
  `<|audio_end|><|vision_end|>`. Audio token k is at s + k; a group goes before every audio token whose
  position is not below its own (video first on ties), as the processor lays the tokens out and
  get_rope_index orders the positions. The track is one clip (encoded once), placed as pieces
  (AudioPlacement.first_row / in_video). The token after the span continues from the last piece's largest
  position + 1, as get_rope_index does (the last piece, not the whole span).
- The plan reads which videos carry audio from the prompt itself (`<|audio_start|>` right before the
  video's first token), so one request may mix videos with and without their track.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from qwenstack.errors import RequestError
from qwenstack.models.qwen3_vl import _token_runs, text_tail_positions
from qwenstack.multimodal.inputs import AudioInput, AudioPlacement, ImageInput, ImagePlacement

Placement = ImagePlacement | AudioPlacement


def group_time_offsets(groups: Sequence[ImageInput], position_id_per_seconds: float) -> list[int]:
    """tau_g of each temporal group of one video (see the module notes); integer or a RequestError."""
    out = []
    for group in groups:
        assert group.video_frame is not None
        tau = float(torch.tensor(group.video_frame.seconds, dtype=torch.float32) * position_id_per_seconds)
        if abs(tau - round(tau)) > 1e-4:
            raise RequestError(f"a video frame group at {group.video_frame.seconds:g} s gives the fractional "
                               f"time position {tau:g} (position_id_per_seconds {position_id_per_seconds:g}); "
                               "choose a video fps that makes temporal_patch_size / fps x position_id_per_seconds "
                               "whole")
        out.append(round(tau))
    return out


def video_audio_layout(time_offsets: Sequence[int], audio_tokens: int) -> list[tuple[str, int]]:
    """The interleaved span of a video and its audio track as segments ("video", groups) / ("audio", tokens),
    in prompt order: audio tokens k < tau_g come before group g."""
    segments: list[tuple[str, int]] = []
    emitted = 0
    for tau in time_offsets:
        take = min(audio_tokens, max(tau, 0)) - emitted
        if take > 0:
            segments.append(("audio", take))
            emitted += take
        if segments and segments[-1][0] == "video":
            segments[-1] = ("video", segments[-1][1] + 1)
        else:
            segments.append(("video", 1))
    if audio_tokens > emitted:
        segments.append(("audio", audio_tokens - emitted))
    return segments


def split_videos(images: Sequence[ImageInput]) -> tuple[list[ImageInput], list[list[ImageInput]]]:
    """(the images, the videos as lists of their groups), each in prompt order."""
    stills: list[ImageInput] = []
    videos: list[list[ImageInput]] = []
    for item in images:
        if item.video_frame is None:
            stills.append(item)
        elif item.video_frame.index == 0 or not videos:
            videos.append([item])
        else:
            videos[-1].append(item)
    return stills, videos


def plan_placements(model: Any, ids: Sequence[int], images: Sequence[ImageInput],
                    audios: Sequence[AudioInput]) -> list[Placement]:
    """Places images, clips and videos on their placeholder runs (each kind in prompt order; a video's audio
    track is the next clip when `<|audio_start|>` opens the video). Raises RequestError when they disagree."""
    a = model.args.thinker
    m = model.merge_size
    kinds = {a.image_token_id: "image", a.audio_token_id: "audio", a.video_token_id: "video"}
    runs = sorted((offset, length, kind) for token, kind in kinds.items() for offset, length in _token_runs(ids, token))
    stills, videos = split_videos(images)
    need = {"image": len(stills), "audio": len(audios), "video": len(videos)}
    it_images, it_audios, it_videos = iter(stills), iter(audios), iter(videos)
    placements: list[Placement] = []
    counts = {"image": 0, "audio": 0, "video": 0}

    def next_of(kind: str, source: Any) -> Any:
        counts[kind] += 1
        item = next(source, None)
        if item is None:
            raise RequestError(f"the prompt has more {kind} placeholder runs than {kind} inputs ({need[kind]})")
        return item

    i = 0
    while i < len(runs):
        offset, length, kind = runs[i]
        i += 1
        if kind == "image":
            image = next_of("image", it_images)
            t, h, w = image.grid_thw
            if h % m or w % m:
                raise RequestError(f"image {counts['image'] - 1}: grid {image.grid_thw} is not a multiple of the "
                                   f"merge size {m}")
            if length != image.num_tokens(m):
                raise RequestError(f"image {counts['image'] - 1} needs {image.num_tokens(m)} placeholder tokens, "
                                   f"the prompt has {length}")
            placements.append(ImagePlacement(offset, length, image))
        elif kind == "audio":
            audio = next_of("audio", it_audios)
            if length != model.audio_tokens(audio):
                raise RequestError(f"audio clip {counts['audio'] - 1} needs {model.audio_tokens(audio)} placeholder "
                                   f"tokens, the prompt has {length}")
            placements.append(AudioPlacement(offset, length, audio))
        else:
            groups = next_of("video", it_videos)
            per_group = groups[0].num_tokens(m)
            if any(g.grid_thw != groups[0].grid_thw for g in groups):
                raise RequestError(f"video {counts['video'] - 1}: its frame groups differ in size")
            with_audio = offset >= 2 and ids[offset - 1] == a.audio_start_token_id and ids[offset - 2] == (
                a.vision_start_token_id)
            if not with_audio:
                if length != per_group * len(groups):
                    raise RequestError(f"video {counts['video'] - 1} needs {per_group * len(groups)} placeholder "
                                       f"tokens, the prompt has {length}")
                placements += [ImagePlacement(offset + j * per_group, per_group, g) for j, g in enumerate(groups)]
                continue
            audio = next_of("audio", it_audios)
            layout = video_audio_layout(group_time_offsets(groups, a.position_id_per_seconds),
                                        model.audio_tokens(audio))
            i -= 1  # the layout's segments are the next runs, starting with this one
            at, group, row = offset, 0, 0
            for seg_kind, count in layout:
                size = count * per_group if seg_kind == "video" else count
                if i >= len(runs) or runs[i] != (at, size, seg_kind):
                    raise RequestError(f"video {counts['video'] - 1}: its frames and audio track are not laid out "
                                       "as Qwen3-Omni interleaves them")
                i += 1
                if seg_kind == "video":
                    placements += [ImagePlacement(at + j * per_group, per_group, g)
                                   for j, g in enumerate(groups[group:group + count])]
                    group += count
                else:
                    placements.append(AudioPlacement(at, count, audio, first_row=row, in_video=True))
                    row += count
                at += size
    for kind, source in (("image", it_images), ("audio", it_audios), ("video", it_videos)):
        if next(source, None) is not None:
            raise RequestError(f"{need[kind]} {kind} input(s) were given but the prompt has placeholders for "
                               f"{counts[kind]}")
    return placements


def rope_positions(prompt_len: int, placements: Sequence[Placement], merge_size: int,
                   position_id_per_seconds: float) -> tuple[torch.Tensor, int]:
    """[3, prompt_len] positions and the rope delta of generated tokens (transformers' get_rope_index)."""
    m = merge_size
    parts: list[torch.Tensor] = []
    index, position = 0, 0  # next prompt index, next free position
    video_start = 0  # first position of the video being placed
    for p in placements:
        if p.offset > index:
            parts.append((torch.arange(p.offset - index, dtype=torch.long) + position).expand(3, -1))
            position += p.offset - index
        if isinstance(p, AudioPlacement):
            base = video_start if p.in_video else position
            part = (torch.arange(p.length, dtype=torch.long) + base + p.first_row).expand(3, -1)
        else:
            t, h, w = p.image.grid_thw
            frame = p.image.video_frame
            if frame is None:
                start, time = position, torch.arange(t) * position_id_per_seconds
            else:
                if frame.index == 0:
                    video_start = position
                start, time = video_start, torch.tensor(group_time_offsets([p.image], position_id_per_seconds))
            tt, hh, ww = torch.meshgrid(time.long(), torch.arange(h // m), torch.arange(w // m), indexing="ij")
            part = torch.stack((tt, hh, ww)).reshape(3, -1) + start
        parts.append(part)
        position = int(part.max()) + 1
        index = p.end
    return text_tail_positions(parts, index, position, prompt_len)


__all__ = ["group_time_offsets", "plan_placements", "rope_positions", "split_videos", "video_audio_layout"]
