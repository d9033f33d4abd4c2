"""POST /v1/audio/speech through the openai SDK, voices, and the 400s, on tiny Qwen3-TTS checkpoints."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import soundfile

import tts_checkpoints as recipe
from checkpoints import write_tokenizer
from qwenstack.serving.app import create_app
from qwenstack.serving.speech import add_speech_model
from qwenstack.tts.audio_format import encode_whole
from qwenstack.tts.loader import load_tts
from server_utils import BackgroundServer

FRAMES = 6  # the random talker rarely says EOS: every request stops at this many frames


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    app = create_app([])
    for kind in ("custom_voice", "base"):
        path = tmp_path_factory.mktemp("tts") / f"tiny-{kind}"
        recipe.build_checkpoint(kind, path)
        write_tokenizer(path)
        add_speech_model(app, load_tts(path), tmp_path_factory.mktemp("voices"), max_frames=FRAMES, kv_blocks=64)
    with BackgroundServer(app) as srv:
        yield srv


def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_speech_create_each_format_decodes(server: BackgroundServer, fmt: str) -> None:
    audio = client(server).audio.speech.create(model="tiny-custom_voice", voice="vivian", input="Hello there.",
                                               response_format=fmt)
    data, rate = soundfile.read(io.BytesIO(audio.content))
    assert rate == 24000
    assert abs(len(data) - FRAMES * 1920) <= (2000 if fmt in ("mp3", "opus") else 0)


def test_streaming_response_writes_a_playable_file(server: BackgroundServer, tmp_path: Path) -> None:
    out = tmp_path / "speech.wav"
    with client(server).audio.speech.with_streaming_response.create(
            model="tiny-custom_voice", voice="eric", input="Streaming speech.", response_format="wav") as response:
        parts = list(response.iter_bytes())
        out.write_bytes(b"".join(parts))
    info = soundfile.info(str(out))
    data, rate = soundfile.read(str(out))
    assert rate == 24000 and info.channels == 1
    assert len(data) == FRAMES * 1920
    assert len(parts) >= 2  # the header and the first audio leave before the end


def test_pcm_and_sse(server: BackgroundServer) -> None:
    pcm = client(server).audio.speech.create(model="tiny-custom_voice", voice="vivian", input="Hi.",
                                             response_format="pcm", extra_body={"seed": 3})
    assert len(pcm.content) == FRAMES * 1920 * 2
    body = {"model": "tiny-custom_voice", "voice": "vivian", "input": "Hi.", "response_format": "pcm",
            "stream_format": "sse", "seed": 3}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "event: speech.audio.delta" and events[-1] == "event: speech.audio.done"


def test_bad_requests_are_400(server: BackgroundServer) -> None:
    c = client(server)
    cases = [dict(model="tiny-custom_voice", voice="nobody", input="Hi."),
             dict(model="tiny-custom_voice", voice="vivian", input="x" * 5000),
             dict(model="tiny-custom_voice", voice="vivian", input="Hi.", extra_body={"language": "klingon"}),
             dict(model="tiny-base", voice="unregistered", input="Hi.")]
    for case in cases:
        with pytest.raises(openai.BadRequestError):
            c.audio.speech.create(response_format="wav", **case)


def test_register_a_voice_and_speak_with_it(server: BackgroundServer) -> None:
    clip = encode_whole(__import__("torch").from_numpy(recipe.reference_clip()), 24000, "wav")
    r = httpx.post(f"{server.url}/v1/audio/voices", data={"model": "tiny-base", "name": "alice"},
                   files={"file": ("ref.wav", clip, "audio/wav")}, timeout=60)
    assert r.status_code == 200, r.text
    bad = httpx.post(f"{server.url}/v1/audio/voices", data={"model": "tiny-base", "name": "bob"},
                     files={"file": ("ref.wav", b"not audio at all", "audio/wav")}, timeout=60)
    assert bad.status_code == 400 and "decoded" in bad.json()["error"]["message"]
    with_text = httpx.post(f"{server.url}/v1/audio/voices",
                           data={"model": "tiny-base", "name": "carol", "transcript": "A chirp for the test."},
                           files={"file": ("ref.wav", clip, "audio/wav")}, timeout=60)
    assert with_text.status_code == 200 and with_text.json()["mode"] == "icl"
    voices = httpx.get(f"{server.url}/v1/audio/voices", params={"model": "tiny-base"}).json()["data"]
    assert [(v["id"], v["mode"]) for v in voices] == [("alice", "x_vector"), ("carol", "icl")]
    builtin = httpx.get(f"{server.url}/v1/audio/voices", params={"model": "tiny-custom_voice"}).json()["data"]
    assert {v["id"] for v in builtin} == {"vivian", "eric"}
    for voice in ("alice", "carol"):
        audio = client(server).audio.speech.create(model="tiny-base", voice=voice, input="Cloned.",
                                                   response_format="wav")
        data, rate = soundfile.read(io.BytesIO(audio.content))
        assert rate == 24000 and len(data) == FRAMES * 1920


def test_serve_tts_option_loads_the_model(tmp_path: Path) -> None:
    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import serve_config_from_args, server_config

    path = tmp_path / "tiny-voice-design"
    recipe.build_checkpoint("voice_design", path)
    commands, _ = discover_commands()
    args = build_parser(commands).parse_args(["serve", "--tts", str(path), "--voices-dir", str(tmp_path / "v")])
    config = server_config(serve_config_from_args(args))
    assert config.speech_models == [str(path)]
    app = create_app([], config)
    assert list(app.state.qwenstack_speech.models) == ["tiny-voice-design"]
