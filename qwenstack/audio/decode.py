"""Encoded audio (WAV, FLAC, OGG/Vorbis, OGG/Opus, MP3, M4A, WebM, ...) -> mono float32 samples at 16 kHz.

Decisions:
- Decoding is libsndfile through `soundfile` (its wheels bundle libsndfile >= 1.1, which reads MP3 and
  Opus); resampling is libsoxr through `soxr` at its high-quality setting. torchaudio is not an option: no
  release loads against the torch we pin.
- What libsndfile cannot read (M4A/MP4 and AAC from phones, WebM/Opus from browsers' MediaRecorder: formats
  OpenAI's transcription API takes) goes through FFmpeg (PyAV, decode_audio_track), as a video's audio track
  does (Qwen3-Omni's audio in video; transformers reads the track with torchcodec). Its frames are converted to
  planar float at the source rate and layout, then take the same downmix, limits and resampling as uploads, so
  a track and the same sound sent as `input_audio` give equal features. A file without an audio stream gives
  None (a silent video: the caller falls back to its frames, as transformers' processor does).
- Channels are averaged to mono (what the reference pipelines do before the feature extractor).
- A file libsndfile opens but finds no samples in (a WAV whose header still says 0 bytes of data, as a
  streaming writer leaves it) is read again by FFmpeg, which reads to the end of the file.
- Anything neither can read, an empty stream, or samples that are not finite raise AudioError, which
  the server turns into a 400: a corrupt upload must never become a 500.
- Limits (encoded bytes, decoded seconds) are checked before the expensive step: bytes before decoding,
  duration from the header before reading the samples.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

SAMPLE_RATE = 16000
# The loudest sample taken. Decoded audio lies within [-1, 1]; a float file may hold more (an int16 or int32
# range written as float), but past ~1e15 the log-mel power spectrum overflows float32 into NaN features.
MAX_PEAK = 1e6


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, or beyond a limit. The message names the reason."""


class AudioTooLong(AudioError):
    """Audio over the seconds limit, found while decoding."""


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int = 25 * 1024 * 1024  # OpenAI's transcription upload limit
    max_seconds: float = 20 * 60.0


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono at `sample_rate`
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with libsoxr (float32 in, float32 out)."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate == target or len(samples) == 0:
        return samples
    import soxr

    return np.ascontiguousarray(soxr.resample(samples, rate, target, quality="HQ"), dtype=np.float32)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[frames] or [frames, channels] -> [frames] float32, channels averaged."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioError(f"audio samples must be 1-D or [frames, channels], got shape {list(samples.shape)}")
    return samples


def decode_audio(data: bytes, limits: AudioLimits = AudioLimits(), target_rate: int = SAMPLE_RATE) -> DecodedAudio:
    """Decodes an encoded audio file to mono float32 at `target_rate`. Raises AudioError."""
    if not data:
        raise AudioError("the audio file is empty")
    if len(data) > limits.max_bytes:
        raise AudioError(f"the audio file is {len(data)} bytes, over the limit of {limits.max_bytes}")
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            # Some containers (MP3 without a header, streamed OGG) report no frame count: check after reading.
            if frames > 0 and frames / rate > limits.max_seconds:
                raise AudioError(f"the audio is {frames / rate:.1f} s long, over the limit of {limits.max_seconds:g} s")
            samples = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (RuntimeError, soundfile.LibsndfileError, TypeError, ValueError) as exc:
        reason = getattr(exc, "error_string", None) or exc  # libsndfile's reason, without the buffer's repr
        failed = AudioError(f"the file is not audio in a supported format (WAV, FLAC, OGG, Opus, MP3, M4A, WebM): "
                            f"{reason}")
    else:
        if len(samples):
            return _finish(samples, rate, channels, limits, target_rate)
        # libsndfile reads no frames from a WAV whose header was never finished (sizes 0, as a streaming writer
        # leaves them); FFmpeg reads such a file to its end, as OpenAI's API and transformers' pipeline do.
        failed = AudioError("the audio holds no samples")
    try:
        decoded = decode_audio_track(data, limits, target_rate, what="the audio")
    except AudioTooLong:
        raise
    except AudioError:
        raise failed from None
    if decoded is None:
        raise failed
    return decoded


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
            chunks, rate, frames = [], 0, 0
            for frame in _frames(container, stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    rate = out.sample_rate
                    # A running count: summing the chunks at every frame was quadratic (a 10-minute WebM/Opus
                    # recording, 30000 frames of 20 ms, took minutes to decode).
                    frames += chunks[-1].shape[1]
                    if frames > limits.max_seconds * rate:
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


def _frames(container: Any, stream: Any) -> Iterator[Any]:
    """The stream's decoded frames; a packet the decoder rejects (the cut-off last frame of an interrupted
    upload or recording) is skipped, as the ffmpeg command line does, instead of failing the whole file."""
    import av

    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes (the Realtime API's audio format) -> float32 in [-1, 1)."""
    if len(data) % 2:
        raise AudioError("PCM16 audio must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def from_samples(samples: np.ndarray, rate: int, limits: AudioLimits = AudioLimits(),
                 target_rate: int = SAMPLE_RATE) -> DecodedAudio:
    """Raw samples ([frames] or [frames, channels]) from the caller -> DecodedAudio. Raises AudioError."""
    if rate <= 0:
        raise AudioError(f"sample rate must be positive, got {rate}")
    samples = np.asarray(samples, dtype=np.float32)
    channels = 1 if samples.ndim == 1 else samples.shape[-1]
    return _finish(samples, rate, channels, limits, target_rate)


def _finish(samples: np.ndarray, rate: int, channels: int, limits: AudioLimits, target_rate: int) -> DecodedAudio:
    mono = to_mono(samples)
    if len(mono) == 0:
        raise AudioError("the audio holds no samples")
    if len(mono) / rate > limits.max_seconds:
        raise AudioError(f"the audio is {len(mono) / rate:.1f} s long, over the limit of {limits.max_seconds:g} s")
    if not np.isfinite(mono).all():
        raise AudioError("the audio holds samples that are not finite numbers")
    peak = float(np.abs(mono).max())
    if peak > MAX_PEAK:
        raise AudioError(f"the audio's samples reach {peak:.3g}: too loud to analyse (decoded audio lies within "
                         f"[-1, 1]; samples up to {MAX_PEAK:g} are taken)")
    return DecodedAudio(resample(mono, rate, target_rate), target_rate, rate, channels)


__all__ = ["AudioError", "AudioLimits", "AudioTooLong", "DecodedAudio", "SAMPLE_RATE", "decode_audio", "from_samples",
           "pcm16_to_float", "resample", "to_mono"]
