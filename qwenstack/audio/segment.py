"""Cutting long audio into pieces the model transcribes well, at silences rather than mid-word.

Decisions:
- Qwen3-ASR attends over 8 s windows but its decoder sees the whole clip; long clips are cut into
  segments of at most `max_seconds` (30 s by default, Whisper's and the extractor's chunk) so each
  transcript stays short and the segments of one file run as a batch.
- A cut goes at the quietest 100 ms (lowest RMS) in the last third of the allowed span: a pause between
  words when there is one, and never in the middle of loud speech if anything quieter is nearby.
- Segments keep their start and end times: they are the timestamps of srt/vtt and verbose_json output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    start: int  # sample index
    end: int

    def seconds(self, rate: int) -> tuple[float, float]:
        return self.start / rate, self.end / rate


def split_at_silences(samples: np.ndarray, rate: int, max_seconds: float = 30.0,
                      frame_seconds: float = 0.1) -> list[Segment]:
    """Consecutive segments covering `samples`, each at most `max_seconds` long."""
    n = len(samples)
    limit = int(max_seconds * rate)
    if n <= limit:
        return [Segment(0, n)]
    frame = max(1, int(frame_seconds * rate))
    frames = n // frame
    energy = np.sqrt(np.mean(np.square(samples[: frames * frame].reshape(frames, frame), dtype=np.float64), axis=1))
    segments, start = [], 0
    while n - start > limit:
        lo = (start + (2 * limit) // 3) // frame
        hi = min((start + limit) // frame, frames)
        if hi <= lo:
            cut = start + limit
        else:
            quietest = lo + int(np.argmin(energy[lo:hi]))
            cut = quietest * frame + frame // 2  # the middle of the quietest frame
        segments.append(Segment(start, cut))
        start = cut
    segments.append(Segment(start, n))
    return segments


__all__ = ["Segment", "split_at_silences"]
