"""Audio bytes for the speech API, made as the samples arrive: wav and pcm are raw PCM16, mp3, opus and aac
are encoded frame by frame by FFmpeg's libmp3lame, libopus and native aac encoders (through PyAV) and leave
as each chunk is encoded; flac is encoded by libsndfile (through soundfile) once the audio is complete.

Decisions:
- pcm is OpenAI's: 16-bit signed little-endian mono at the model's rate (24 kHz), no header.
- A streamed wav announces an unknown length (0xFFFFFFFF in the RIFF and data sizes), as streaming
  servers do; players and soundfile read it to the end of the stream.
- mp3, opus (Ogg) and aac (ADTS) are streamable containers: the muxer writes to a non-seekable sink and flushes after
  every packet (Ogg pages of at most 20 ms), so a chunk's bytes leave with it. The encoders hold back
  their look-ahead (libmp3lame about one 576-sample granule, libopus 6.5 ms) until the next chunk or the end.
- flac stays whole: a streamed FLAC has to write its STREAMINFO (total samples) before the length is
  known, and libsndfile (soundfile.read) cannot read a FLAC of unknown length, so it is sent at the end.
- speed (0.25-4) resamples each chunk by linear interpolation: the audio lasts 1/speed as long and
  faster speech is also higher.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import torch

SSE_FORMATS = ("wav", "pcm")  # what stream_format "sse" carries
FORMATS = ("wav", "pcm", "flac", "mp3", "opus", "aac")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg", "aac": "audio/aac"}
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


class _Sink:
    """A non-seekable file for PyAV's muxer: collects what it writes until taken."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class _AVEncoder:
    """Incremental mp3 / Ogg-Opus / ADTS-AAC encoding of mono float samples (PyAV)."""

    _SPEC = {"mp3": ("mp3", "libmp3lame", {}), "opus": ("ogg", "libopus", {"page_duration": "20000"}),
             "aac": ("adts", "aac", {})}

    def __init__(self, fmt: str, sample_rate: int) -> None:
        import av

        container, codec, options = self._SPEC[fmt]
        self.sink = _Sink()
        self.out = av.open(self.sink, mode="w", format=container, options=options,
                           container_options={"flush_packets": "1"})
        self.stream = self.out.add_stream(codec, rate=sample_rate, layout="mono")
        self.sample_rate, self.pts = sample_rate, 0

    def write(self, samples: torch.Tensor) -> bytes:
        import av

        data = np.clip(samples.detach().float().cpu().numpy(), -1.0, 1.0)
        # PyAV converts the frame to the encoder's sample format and frame size.
        frame = av.AudioFrame.from_ndarray(data[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = self.sample_rate, self.pts
        self.pts += data.shape[0]
        for packet in self.stream.encode(frame):
            self.out.mux(packet)
        return self.sink.take()

    def close(self) -> bytes:
        for packet in self.stream.encode(None):
            self.out.mux(packet)
        self.out.close()
        return self.sink.take()


class ChunkEncoder:
    """One response's audio bytes: `write` each chunk of samples as it is made, then `close`."""

    def __init__(self, fmt: str, sample_rate: int, speed: float = 1.0) -> None:
        self.fmt, self.sample_rate, self.speed = fmt, sample_rate, speed
        self.av = _AVEncoder(fmt, sample_rate) if fmt in _AVEncoder._SPEC else None
        self.held: list[torch.Tensor] = []  # flac: encoded at the end
        self.started = False

    def write(self, samples: torch.Tensor) -> bytes:
        head = b""
        if not self.started:
            self.started = True
            head = wav_header(self.sample_rate) if self.fmt == "wav" else b""
        if not samples.numel():
            return head
        samples = change_speed(samples, self.speed)
        if self.av is not None:
            return head + self.av.write(samples)
        if self.fmt in ("wav", "pcm"):
            return head + pcm16(samples)
        self.held.append(samples)
        return head

    def close(self) -> bytes:
        head = self.write(torch.zeros(0)) if not self.started else b""
        if self.av is not None:
            return head + self.av.close()
        if self.fmt in ("wav", "pcm"):
            return head
        return encode_whole(torch.cat(self.held) if self.held else torch.zeros(0), self.sample_rate, self.fmt)
