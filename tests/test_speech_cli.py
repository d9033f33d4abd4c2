"""`qwenstack say` on a tiny Qwen3-TTS checkpoint."""
from __future__ import annotations

from pathlib import Path

import soundfile

import tts_checkpoints as recipe
from checkpoints import write_tokenizer
from qwenstack.cli import main


def test_say_writes_a_wav(tmp_path: Path) -> None:
    model = tmp_path / "tts"
    recipe.build_checkpoint("custom_voice", model)
    write_tokenizer(model)
    out = tmp_path / "hello.wav"
    assert main(["say", "Hello world.", "--model", str(model), "-o", str(out), "--max-frames", "5",
                 "--voice", "eric", "--seed", "1"]) == 0
    data, rate = soundfile.read(str(out))
    assert rate == 24000 and len(data) == 5 * 1920


def test_say_needs_an_output(tmp_path: Path) -> None:
    assert main(["say", "Hi", "--model", str(tmp_path)]) == 2
