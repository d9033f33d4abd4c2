"""`qwenstack translate`: a file through the same streaming session as the server (as fast as possible),
and --mic with a stand-in recorder on PATH that plays a raw PCM16 file and ends (as Ctrl-C would)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

from qwenstack.cli import main
from translate_fixtures import build_parts, pcm16_bytes, spoken_clip


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_parts(tmp_path_factory.mktemp("translate-cli"))


def _models(parts: dict[str, Path]) -> list[str]:
    return ["--asr", str(parts["asr"]), "--llm", str(parts["llm"]), "--tts", str(parts["tts"])]


@pytest.mark.slow
def test_translate_file_and_mic(parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    samples, _ = spoken_clip(tmp_path)
    wav = tmp_path / "speech.wav"
    soundfile.write(str(wav), samples[:24000 * 4], 24000)
    out = tmp_path / "out.wav"
    assert main(["translate", "--to", "de", str(wav), "-o", str(out), "--voice", "eric", *_models(parts)]) == 0
    printed = capsys.readouterr()
    translation = printed.out.strip()
    assert translation and f"to {out}" in printed.err
    audio, rate = soundfile.read(str(out))
    assert rate == 24000 and len(audio) > 0 and np.abs(audio).max() > 0
    # --mic: the first recorder on PATH is ours; it plays 3 s of the clip and ends
    raw = tmp_path / "mic.raw"
    raw.write_bytes(pcm16_bytes(samples[:24000 * 3]))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "arecord").write_text(f"#!/bin/sh\ncat {raw}\n")
    (bin_dir / "arecord").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    mic_out = tmp_path / "mic.wav"
    assert main(["translate", "--to", "fr", "--mic", "-o", str(mic_out), *_models(parts)]) == 0
    assert capsys.readouterr().out.strip()
    assert soundfile.info(str(mic_out)).frames > 0


def test_translate_usage_errors(parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["translate", "--to", "de", *_models(parts)]) == 2  # neither a file nor --mic
    assert main(["translate", "--to", "klingon", str(tmp_path / "x.wav"), *_models(parts)]) == 2
    assert "not supported" in capsys.readouterr().err
