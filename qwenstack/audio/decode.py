"""Encoded audio (WAV, FLAC, OGG/Vorbis, OGG/Opus, MP3, M4A, WebM, ...) -> mono float32 samples at 16 kHz.

Decisions:
- Decoding is libsndfile through `soundfile` (its wheels bundle libsndfile >= 1.1, which reads MP3 and
  Opus); resampling is libsoxr through `soxr` at its high-quality setting. torchaudio is not an option: no
  release loads against the torch we pin.
- What libsndfile cannot read (M4A/MP4 and AAC from phones, WebM/Opus from browsers' MediaRecorder: formats
  OpenAI's transcription API takes) goes through FFmpeg (PyAV), as a video's audio track does.
- Channels are averaged to mono (what the reference pipelines do before the feature extractor).
- Anything neither can read, an empty stream, or samples that are not finite raise AudioError, which
  the server turns into a 400: a corrupt upload must never become a 500.
- Limits (encoded bytes, decoded seconds) are checked before the expensive step: bytes before decoding,
  duration from the header before reading the samples.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000


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
        return _finish(samples, rate, channels, limits, target_rate)
    from qwenstack.audio.video_track import decode_audio_track

    try:
        decoded = decode_audio_track(data, limits, target_rate, what="the audio")
    except AudioTooLong:
        raise
    except AudioError:
        raise failed from None
    if decoded is None:
        raise failed
    return decoded


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
    return DecodedAudio(resample(mono, rate, target_rate), target_rate, rate, channels)


__all__ = ["AudioError", "AudioLimits", "AudioTooLong", "DecodedAudio", "SAMPLE_RATE", "decode_audio", "from_samples",
           "pcm16_to_float", "resample", "to_mono"]
