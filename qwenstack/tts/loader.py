"""A Qwen3-TTS checkpoint directory -> the talker model, its codec decoder and its text tokenizer.

Layout (as published): config.json + model*.safetensors (talker, code predictor, speaker encoder),
speech_tokenizer/{config.json, model.safetensors} (the 12 Hz codec), and the Qwen2 tokenizer files.
Both weight sets go through the strict loader, so a missing or unexpected tensor is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qwenstack.config import read_config
from qwenstack.errors import ConfigError
from qwenstack.models.qwen3_tts import Qwen3TTSArgs, Qwen3TTSForConditionalGeneration
from qwenstack.models.qwen3_tts_codec import Codec12Hz, Codec12HzArgs
from qwenstack.tokenizer import Tokenizer
from qwenstack.weights import load_weights


@dataclass
class TTSModel:
    name: str
    model: Qwen3TTSForConditionalGeneration
    codec: Codec12Hz
    tokenizer: Tokenizer | None

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def kind(self) -> str:
        return self.model.args.tts_model_type

    @property
    def speakers(self) -> list[str]:
        return list(self.model.args.talker.spk_id)

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.name} has no tokenizer files, so it cannot read text")
        return self.tokenizer.encode(text)

    def text_ids(self, text: str) -> list[int]:
        """The wrapped text the talker reads: 3 role ids, the text, 5 tail ids."""
        return self._encode(f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n")

    def instruct_ids(self, instructions: str) -> list[int]:
        return self._encode(f"<|im_start|>user\n{instructions}<|im_end|>\n")

    def ref_ids(self, transcript: str) -> list[int]:
        return self._encode(f"<|im_start|>assistant\n{transcript}<|im_end|>\n")


def _build(cls: type, model_dir: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    args = cls.args_class.from_dict(read_config(model_dir))
    with torch.device("meta"):
        model = cls(args)
    load_weights(model, model_dir, dtype, device)
    return model.eval()


def load_tts(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
             codec_dtype: torch.dtype | None = None) -> TTSModel:
    model_dir = Path(model_dir)
    if not (model_dir / "speech_tokenizer").is_dir():
        raise ConfigError(f"{model_dir} has no speech_tokenizer/ directory (the 12 Hz codec)")
    model = _build(Qwen3TTSForConditionalGeneration, model_dir, dtype, device)
    codec = _build(Codec12Hz, model_dir / "speech_tokenizer", codec_dtype or dtype, device)
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file()
    tokenizer = Tokenizer.from_dir(model_dir) if has_tokenizer else None
    return TTSModel(model_dir.name, model, codec, tokenizer)  # type: ignore[arg-type]
