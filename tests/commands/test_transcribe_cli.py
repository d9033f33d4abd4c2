"""`qwenstack transcribe`: files in several formats (espeak-ng speech, a sox-made long file with pauses),
srt/vtt/json output with segment times, a progress bar, and clear failures."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from asr_checkpoints import build_scripted_asr, espeak_wav
from qwenstack.cli import main

ANSWER = "hello there, this is a test."
SMALL = ["--kv-cache-memory", "16MiB", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_asr(tmp_path_factory.mktemp("cli-asr"), "language English<asr_text>" + ANSWER)


@pytest.mark.skipif(shutil.which("sox") is None or shutil.which("espeak-ng") is None,
                    reason="espeak-ng and sox are installed by scripts/test.sh")
def test_transcribe_files_to_srt_and_json(scripted: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    speech = espeak_wav("Hello there, this is a test of the speech path.", tmp_path / "speech.wav")
    long = tmp_path / "long.ogg"  # 40 s of tone with a 1 s pause at 25 s: cut there, not at 30 s
    subprocess.run(["sox", "-n", "-r", "44100", "-c", "2", str(long), "synth", "25", "sine", "300", ":",
                    "synth", "1", "sine", "0", "vol", "0", ":", "synth", "14", "sine", "500"], check=True)
    assert main(["transcribe", str(speech), str(long), "--model", str(scripted), "--format", "srt", *SMALL]) == 0
    captured = capsys.readouterr()
    assert f"=== {speech}\n1\n00:00:00,000 --> " in captured.out and ANSWER in captured.out
    blocks = captured.out.split(f"=== {long}\n")[1].strip().split("\n\n")
    assert len(blocks) == 2 and blocks[0].startswith("1\n00:00:00,000 --> 00:00:25,")
    assert blocks[1].endswith(f"--> 00:00:40,000\n{ANSWER}")
    assert "2/2 segments" in captured.err  # the progress bar
    out_dir = tmp_path / "out"
    assert main(["transcribe", str(long), "--model", str(scripted), "--format", "verbose_json", "-q",
                 "--output-dir", str(out_dir), *SMALL]) == 0
    verbose = json.loads((out_dir / "long.json").read_text())
    assert verbose["language"] == "english" and verbose["duration"] == 40.0 and len(verbose["segments"]) == 2
    assert verbose["text"] == f"{ANSWER} {ANSWER}"


def test_transcribe_failures(scripted: Path, tiny_qwen3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 20)
    assert main(["transcribe", str(bad), "--model", str(scripted), "-q", *SMALL]) == 1
    assert "not audio" in capsys.readouterr().err
    assert main(["transcribe", str(bad), "--model", str(tiny_qwen3), *SMALL]) == 1
    assert "no audio encoder" in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "missing.wav"), "--model", str(scripted), *SMALL]) == 1
    assert main(["transcribe", str(bad), "--model", str(scripted), "--language", "xx", *SMALL]) == 1
