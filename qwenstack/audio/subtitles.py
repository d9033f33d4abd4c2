"""Transcript segments -> SubRip (srt) and WebVTT text, the two subtitle formats OpenAI's API returns."""
from __future__ import annotations

from typing import Iterable


def _clock(seconds: float, decimal: str) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def to_srt(segments: Iterable[tuple[float, float, str]]) -> str:
    blocks = [f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{text.strip()}\n"
              for i, (a, b, text) in enumerate(segments, start=1)]
    return "\n".join(blocks)


def to_vtt(segments: Iterable[tuple[float, float, str]]) -> str:
    blocks = [f"{_clock(a, '.')} --> {_clock(b, '.')}\n{text.strip()}\n" for a, b, text in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


__all__ = ["to_srt", "to_vtt"]
