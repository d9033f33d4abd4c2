"""Cloned voices on disk: a reference clip -> its speaker embedding, stored under a name.

Decisions:
- A voice is `<dir>/<name>.json` (model, transcript) plus `<name>.pt` (the speaker embedding and, when a
  transcript came with the clip, the clip's codec codes). With a transcript the voice speaks in ICL mode
  (the talker continues the reference's codes after its text), without one from the embedding alone
  (x-vector mode). The clip itself is not kept.
- Names are short slugs, so a name can never escape the directory.
- The clip is decoded by libsndfile (soundfile): anything it cannot read is a RequestError (a 400).
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwenstack.errors import RequestError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
MAX_CLIP_SECONDS = 60.0


def decode_clip(data: bytes, sample_rate: int) -> torch.Tensor:
    """Audio file bytes -> mono float32 samples at sample_rate."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types for bad input
        reason = getattr(exc, "error_string", None) or exc  # libsndfile's reason, without the buffer's repr
        raise RequestError(f"the reference clip could not be decoded as audio: {reason}") from None
    mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
    if not torch.isfinite(mono).all():
        raise RequestError("the reference clip holds samples that are not finite numbers")
    if mono.numel() < rate * 0.2:
        raise RequestError("the reference clip is shorter than 0.2 s")
    if mono.numel() > rate * MAX_CLIP_SECONDS:
        raise RequestError(f"the reference clip is longer than {MAX_CLIP_SECONDS:.0f} s")
    if rate != sample_rate:
        n = int(round(mono.numel() * sample_rate / rate))
        mono = torch.nn.functional.interpolate(mono[None, None], size=n, mode="linear", align_corners=False)[0, 0]
    return mono.clamp(-1, 1)


@dataclass
class Voice:
    name: str
    embedding: torch.Tensor
    codes: torch.Tensor | None  # the reference clip's codec codes (ICL mode), with its transcript
    transcript: str | None


class VoiceStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def check_name(name: str) -> None:
        if not NAME.match(name):
            raise RequestError("a voice name is 1-64 letters, digits, '-' or '_', starting with a letter or digit")

    def _paths(self, name: str) -> tuple[Path, Path]:
        self.check_name(name)
        return self.directory / f"{name}.json", self.directory / f"{name}.pt"

    def save(self, name: str, model: str, embedding: torch.Tensor, transcript: str | None,
             codes: torch.Tensor | None = None) -> dict:
        meta_path, tensor_path = self._paths(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {"embedding": embedding.detach().float().cpu()}
        if codes is not None:
            tensors["codes"] = codes.detach().cpu()
        torch.save(tensors, tensor_path)
        mode = "icl" if codes is not None and transcript else "x_vector"
        meta = {"id": name, "model": model, "transcript": transcript, "type": "cloned", "mode": mode}
        meta_path.write_text(json.dumps(meta))
        return meta

    def load(self, name: str, model: str) -> Voice | None:
        if not NAME.match(name):
            return None
        meta_path, tensor_path = self._paths(name)
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("model") != model:
            return None
        tensors = torch.load(tensor_path, weights_only=True)
        return Voice(name, tensors["embedding"], tensors.get("codes"), meta.get("transcript"))

    def list(self, model: str) -> list[dict]:
        if not self.directory.is_dir():
            return []
        voices = [json.loads(p.read_text()) for p in sorted(self.directory.glob("*.json"))]
        return [v for v in voices if v.get("model") == model]
