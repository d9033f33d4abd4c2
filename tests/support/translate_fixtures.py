"""A tiny live-translation pipeline for tests: a scripted Qwen3-ASR (whatever the audio, greedy decoding
writes a known multi-sentence transcript), a random tiny Qwen3 as the translator, a random tiny Qwen3-TTS
CustomVoice model; greedy everywhere, so a stream can be compared with the offline pipeline exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import tts_checkpoints as recipe
from asr_checkpoints import build_scripted_asr, espeak_wav
from checkpoints import build_hf_checkpoint, dense_config, write_tokenizer
from qwenstack.audio.decode import resample
from qwenstack.engine.engine import EngineConfig
from qwenstack.models.registry import load_model
from qwenstack.serving.served import ServedModel, build_served_model
from qwenstack.tokenizer import Tokenizer
from qwenstack.translate.pipeline import PipelineSettings, TranslationPipeline
from qwenstack.translate.translator import TranslatorSettings
from qwenstack.tts.engine import SpeechEngine, SpeechParams, SpeechService
from qwenstack.tts.loader import load_tts

SENTENCES = ["Good morning everyone.", "The weather is fine today, and the sun is warm.",
             "We will meet at noon near the old river.", "Thank you for listening."]
TRANSCRIPT = " ".join(SENTENCES)
SPEECH_FRAMES = 6  # the random talker rarely says EOS: each unit's speech stops at this many 80 ms frames


def build_parts(root: Path) -> dict[str, Path]:
    paths = {"asr": root / "asr", "llm": root / "llm", "tts": root / "tts"}
    build_scripted_asr(paths["asr"], "language English<asr_text>" + TRANSCRIPT)
    build_hf_checkpoint(paths["llm"], "qwen3", dense_config(max_position_embeddings=2048))
    recipe.build_checkpoint("custom_voice", paths["tts"])
    write_tokenizer(paths["tts"])
    return paths


def served(name: str, path: Path) -> ServedModel:
    return build_served_model(name, load_model(path, dtype=torch.float32), Tokenizer.from_dir(path),
                              EngineConfig(block_size=8, kv_cache_memory=2**24),
                              hf_config=json.loads((path / "config.json").read_text()), model_dir=path)


def settings() -> PipelineSettings:
    return PipelineSettings(translator=TranslatorSettings(min_tokens=6, max_tokens_per_source_token=1.0),
                            speech=SpeechParams(temperature=0, subtalker_temperature=0, max_frames=SPEECH_FRAMES))


def build_pipeline(paths: dict[str, Path], name: str = "live-translate") -> TranslationPipeline:
    asr, llm = served("asr", paths["asr"]), served("llm", paths["llm"])
    tts = load_tts(paths["tts"])
    service = SpeechService(SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=64), name="test-tts")
    return TranslationPipeline(name, asr, asr.asr, llm, tts, service, settings())


def spoken_clip(out_dir: Path, rate: int = 24000) -> tuple[np.ndarray, list[float]]:
    """The sentences spoken by espeak-ng one after another (float32 at `rate`), and where each ends (s)."""
    import soundfile

    parts, ends, total = [], [], 0
    for i, sentence in enumerate(SENTENCES):
        path = espeak_wav(sentence, out_dir / f"s{i}.wav")
        assert path is not None, "espeak-ng is needed for the scripted clip"
        data, sr = soundfile.read(str(path), dtype="float32")
        samples = resample(data if data.ndim == 1 else data.mean(axis=1), sr, rate)
        parts.append(samples)
        total += len(samples)
        ends.append(total / rate)
    return np.concatenate(parts), ends


def pcm16_bytes(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def speech_idle(service: SpeechService) -> bool:
    engine = service.engine
    return not engine.has_work() and engine.blocks.num_free_blocks == engine.blocks.num_blocks
