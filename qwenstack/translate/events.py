"""What a translation session tells its client, independent of the wire (the socket turns these into
OpenAI Realtime translation events; the CLI writes them to a terminal and a file)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class InputTranscript:
    delta: str  # newly committed source text (append-only; carries its own leading space)
    tentative: str  # the source tail the next decode may still rewrite
    elapsed_ms: int  # input audio the decode had heard


@dataclass
class OutputTranscript:
    delta: str  # newly committed translation (append-only)
    tentative: str  # a preview translation of the uncommitted source tail
    elapsed_ms: int
    language: str


@dataclass
class OutputAudio:
    samples: np.ndarray  # float32 mono
    sample_rate: int
    elapsed_ms: int
    lag_ms: int  # first audio of a unit: since the audio whose decode completed the unit arrived; else 0


@dataclass
class SessionFailed:
    code: str
    message: str


@dataclass
class Closed:
    pass


Event = InputTranscript | OutputTranscript | OutputAudio | SessionFailed | Closed

__all__ = ["Closed", "Event", "InputTranscript", "OutputAudio", "OutputTranscript", "SessionFailed"]
