"""Audio bytes for the speech API: wav and pcm stream as samples arrive; flac, mp3 and opus are encoded
by libsndfile (through soundfile, libsndfile >= 1.1 writes MP3 and OGG/Opus) once the audio is complete.

Decisions:
- pcm is OpenAI's: 16-bit signed little-endian mono at the model's rate (24 kHz), no header.
- A streamed wav announces an unknown length (0xFFFFFFFF in the RIFF and data sizes), as streaming
  servers do; players and soundfile read it to the end of the stream.
- speed (0.25-4) resamples the waveform by linear interpolation: faster speech is also higher.
"""
from __future__ import annotations

import io
import struct
from typing import Iterator

import numpy as np
import torch

STREAMING_FORMATS = ("wav", "pcm")
FORMATS = ("wav", "pcm", "flac", "mp3", "opus")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg"}
_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}


def pcm16(samples: torch.Tensor) -> bytes:
    clipped = np.clip(samples.detach().float().cpu().numpy(), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int, num_samples: int | None = None) -> bytes:
    """44-byte PCM16 mono header; num_samples None = unknown length (streaming)."""
    data = 0xFFFFFFFF if num_samples is None else num_samples * 2
    riff = 0xFFFFFFFF if num_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", data))


def change_speed(samples: torch.Tensor, speed: float) -> torch.Tensor:
    if speed == 1.0 or samples.numel() < 2:
        return samples
    n = max(1, int(round(samples.numel() / speed)))
    return torch.nn.functional.interpolate(samples[None, None].float(), size=n, mode="linear",
                                           align_corners=True)[0, 0]


def encode_whole(samples: torch.Tensor, sample_rate: int, fmt: str) -> bytes:
    if fmt == "pcm":
        return pcm16(samples)
    if fmt == "wav":
        return wav_header(sample_rate, samples.numel()) + pcm16(samples)
    import soundfile

    container, subtype = _SOUNDFILE[fmt]
    buf = io.BytesIO()
    # Opus runs at 8/12/16/24/48 kHz, so the model's 24 kHz goes in as is.
    soundfile.write(buf, samples.detach().float().cpu().numpy(), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def stream_bytes(chunks: Iterator[torch.Tensor], sample_rate: int, fmt: str, speed: float = 1.0) -> Iterator[bytes]:
    """Audio bytes as the chunks of samples arrive (wav, pcm), or all at the end (other formats)."""
    if fmt in STREAMING_FORMATS:
        if fmt == "wav":
            yield wav_header(sample_rate)
        for samples in chunks:
            if samples.numel():
                yield pcm16(change_speed(samples, speed))
        return
    whole = [s for s in chunks if s.numel()]
    samples = torch.cat(whole) if whole else torch.zeros(0)
    yield encode_whole(change_speed(samples, speed), sample_rate, fmt)
