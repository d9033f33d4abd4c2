"""A video file's audio track -> mono float32 samples at 16 kHz (Qwen3-Omni's audio in video).

Decisions:
- PyAV (FFmpeg's libraries) reads the first audio stream, as it reads the frames (multimodal/
  video_processing.py); transformers reads the track with torchcodec. Frames are converted to planar float
  at the source rate and layout, then go through the same mono downmix, limits and libsoxr resampling as
  uploaded audio (audio/decode.py), so a track and the same sound sent as `input_audio` give equal features.
- A video without an audio stream gives None (the caller falls back to the frames alone, as transformers'
  processor does for a silent video); a corrupt track is an AudioError.
"""
from __future__ import annotations

import io

import numpy as np

from qwenstack.audio.decode import SAMPLE_RATE, AudioError, AudioLimits, AudioTooLong, DecodedAudio, from_samples


def decode_audio_track(data: bytes, limits: AudioLimits = AudioLimits(), target_rate: int = SAMPLE_RATE,
                       what: str = "the video's audio track") -> DecodedAudio | None:
    """The first audio stream of an encoded video (or audio) file, decoded to mono at target_rate; None when it
    has none. `what` names the track in the messages of AudioError."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")  # planar float, source layout and rate
            chunks, rate = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    rate = out.sample_rate
                    if sum(c.shape[1] for c in chunks) > limits.max_seconds * rate:
                        raise AudioTooLong(f"{what} is over the limit of {limits.max_seconds:g} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except AudioError:
        raise
    except Exception as exc:  # PyAV's errors for a corrupt or unsupported track
        raise AudioError(f"{what} could not be decoded: {getattr(exc, 'strerror', None) or exc}") from None
    if not chunks or not rate:
        raise AudioError(f"{what} holds no samples")
    samples = np.concatenate(chunks, axis=1).T  # [frames, channels]
    return from_samples(samples, rate, limits, target_rate)


__all__ = ["decode_audio_track"]
