"""`qwenstack say` on a tiny Qwen3-TTS checkpoint."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
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


def test_say_play_streams_pcm_to_the_player(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stub `aplay` first on PATH records its arguments and the stream it is fed.
    model = tmp_path / "tts"
    recipe.build_checkpoint("custom_voice", model)
    write_tokenizer(model)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    player = bin_dir / "aplay"
    player.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat > {tmp_path}/stream.raw\n')
    player.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["say", "Hello world.", "--model", str(model), "--play", "--max-frames", "5", "--seed", "1"]) == 0
    assert (tmp_path / "args").read_text().split() == ["-q", "-f", "S16_LE", "-c", "1", "-r", "24000"]
    raw = (tmp_path / "stream.raw").read_bytes()
    # What aplay was told it gets: 16-bit little-endian mono at 24 kHz; the same as the file `say -o` writes.
    data, rate = soundfile.read(io.BytesIO(raw), format="RAW", subtype="PCM_16", samplerate=24000, channels=1,
                                endian="LITTLE")
    assert rate == 24000 and len(data) == 5 * 1920
    out = tmp_path / "same.wav"
    assert main(["say", "Hello world.", "--model", str(model), "-o", str(out), "--max-frames", "5", "--seed", "1"]) == 0
    written, _ = soundfile.read(str(out))
    assert abs(data - written).max() < 1e-4
