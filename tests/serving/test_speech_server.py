"""POST /v1/audio/speech through the openai SDK, voices, and the 400s, on tiny Qwen3-TTS checkpoints."""
from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import av

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

FRAMES = 6  # every request stops at this many frames: the talker's EOS is suppressed below


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    app = create_app([])
    for kind in ("custom_voice", "base", "voice_design"):
        path = tmp_path_factory.mktemp("tts") / f"tiny-{kind}"
        recipe.build_checkpoint(kind, path)
        write_tokenizer(path)
        served = add_speech_model(app, load_tts(path), tmp_path_factory.mktemp("voices"), max_frames=FRAMES,
                                  kv_blocks=64)
        # A random talker says EOS with a chance of ~1/50 a frame (top-k 50 of 65 codes): suppressed, so that
        # the lengths these tests check do not depend on the sampler's random stream.
        served.service.engine.suppress.append(served.service.engine.eos)
    with BackgroundServer(app) as srv:
        yield srv


def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


@contextmanager
def held_after_first_audio(server: BackgroundServer, model: str = "tiny-custom_voice") -> Iterator[dict[str, Any]]:
    """Holds the model's engine before its next step once a step has made audio, until state["release"] is
    set: whatever the client holds by then left before the synthesis finished."""
    engine = server.server.config.app.state.qwenstack_speech.models[model].service.engine
    step = engine.step
    state: dict[str, Any] = {"release": threading.Event(), "audio_made": False, "finished": False}

    def gated() -> list:
        if state["audio_made"]:
            assert state["release"].wait(60)
        chunks = step()
        state["audio_made"] = state["audio_made"] or any(c.samples.numel() for c in chunks)
        state["finished"] = state["finished"] or any(c.finished for c in chunks)
        return chunks

    engine.step = gated
    try:
        yield state
    finally:
        state["release"].set()
        del engine.step


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_speech_create_each_format_decodes(server: BackgroundServer, fmt: str) -> None:
    audio = client(server).audio.speech.create(model="tiny-custom_voice", voice="vivian", input="Hello there.",
                                               response_format=fmt)
    data, rate = soundfile.read(io.BytesIO(audio.content))
    assert rate == 24000
    assert abs(len(data) - FRAMES * 1920) <= (2000 if fmt in ("mp3", "opus") else 0)


def test_speech_aac_decodes(server: BackgroundServer) -> None:
    """aac, one of OpenAI's formats (the SDK offers it): an ADTS stream of mono 24 kHz audio."""
    audio = client(server).audio.speech.create(model="tiny-custom_voice", voice="vivian", input="Hello there.",
                                               response_format="aac")
    assert audio.response.headers["content-type"] == "audio/aac"
    with av.open(io.BytesIO(audio.content)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert (container.format.name, stream.rate, stream.channels) == ("aac", 24000, 1)
    assert abs(samples - FRAMES * 1920) <= 2048  # the encoder's priming and last-frame padding


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
def test_streaming_response_sends_audio_before_the_synthesis_ends(server: BackgroundServer, tmp_path: Path,
                                                                   fmt: str) -> None:
    out = tmp_path / f"speech.{fmt}"
    with held_after_first_audio(server) as state:
        with client(server).audio.speech.with_streaming_response.create(
                model="tiny-custom_voice", voice="eric", input="Streaming speech.", response_format=fmt) as response:
            parts = response.iter_bytes()
            first = next(parts)  # the engine is held after its first audio chunk, so this is early audio
            assert first and not state["finished"]
            state["release"].set()
            out.write_bytes(first + b"".join(parts))
    assert state["finished"]
    info = soundfile.info(str(out))
    data, rate = soundfile.read(str(out))
    assert rate == 24000 and info.channels == 1
    if fmt == "wav":
        assert len(first) > 44  # the header and samples of the first frame
        assert len(data) == FRAMES * 1920
    else:  # the encoders' delay and padding, under one 80 ms frame
        assert abs(len(data) - FRAMES * 1920) < 1920
    with av.open(str(out)) as container:  # FFmpeg reads the stream too
        assert sum(f.samples for f in container.decode(audio=0)) > 0


def test_pcm_and_sse(server: BackgroundServer) -> None:
    pcm = client(server).audio.speech.create(model="tiny-custom_voice", voice="vivian", input="Hi.",
                                             response_format="pcm", extra_body={"seed": 3})
    assert len(pcm.content) == FRAMES * 1920 * 2
    body = {"model": "tiny-custom_voice", "voice": "vivian", "input": "Hi.", "response_format": "pcm",
            "stream_format": "sse", "seed": 3}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as r:
        lines = list(r.iter_lines())
    events = [line for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert events[0] == "event: speech.audio.delta" and events[-1] == "event: speech.audio.done"
    assert len(events) >= 3  # the audio leaves in several deltas
    deltas = [p for p in payloads if p["type"] == "speech.audio.delta"]
    audio = b"".join(base64.b64decode(p["audio"]) for p in deltas)
    assert audio == pcm.content  # same seed: the deltas are the non-SSE response, byte for byte
    done = payloads[-1]
    assert done["type"] == "speech.audio.done" and done["usage"]["output_tokens"] == FRAMES
    # The SDK sends no response_format with stream_format "sse" unless told: the events then carry pcm.
    with client(server).audio.speech.with_streaming_response.create(
            model="tiny-custom_voice", voice="vivian", input="Hi.", stream_format="sse", extra_body={"seed": 3}) as r:
        sdk_lines = list(r.iter_lines())
    sdk = [json.loads(line[len("data: "):]) for line in sdk_lines if line.startswith("data: ")]
    assert b"".join(base64.b64decode(p["audio"]) for p in sdk if p["type"] == "speech.audio.delta") == pcm.content


def test_concurrent_requests_equal_one_at_a_time(server: BackgroundServer) -> None:
    def speak(i: int) -> bytes:
        return client(server).audio.speech.create(
            model="tiny-custom_voice", voice=("vivian", "eric")[i % 2], input=f"Request number {i}.",
            response_format="pcm", extra_body={"seed": 10 + i}).content

    one_by_one = [speak(i) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(speak, range(3)))
    assert together == one_by_one
    assert len(set(together)) == 3


def test_speed_changes_the_length(server: BackgroundServer) -> None:
    # speed resamples: 1/speed as many samples (and a higher or lower pitch).
    def length(speed: float) -> int:
        audio = client(server).audio.speech.create(model="tiny-custom_voice", voice="vivian", input="Hi.",
                                                   response_format="wav", speed=speed, extra_body={"seed": 4})
        data, rate = soundfile.read(io.BytesIO(audio.content))
        assert rate == 24000
        return len(data)

    assert length(1.0) == FRAMES * 1920
    assert length(2.0) == FRAMES * 1920 // 2
    assert length(0.5) == FRAMES * 1920 * 2


def test_voice_design_speaks_its_instructions(server: BackgroundServer) -> None:
    def speak(instructions: str | None) -> bytes:
        extra = {"instructions": instructions} if instructions else {}
        return client(server).audio.speech.create(model="tiny-voice_design", voice="default", input="Hello.",
                                                  response_format="pcm", extra_body={"seed": 6}, **extra).content

    calm, bright = speak("A calm, deep voice."), speak("A bright, fast voice.")
    assert len(calm) == len(bright) == FRAMES * 1920 * 2
    assert calm != bright  # the description reaches the talker's prompt
    assert speak("A calm, deep voice.") == calm
    with pytest.raises(openai.BadRequestError):
        client(server).audio.speech.create(model="tiny-voice_design", voice="vivian", input="Hello.")


def test_bad_requests_are_400(server: BackgroundServer) -> None:
    c = client(server)
    cases = [dict(model="tiny-custom_voice", voice="nobody", input="Hi."),
             dict(model="tiny-custom_voice", voice="vivian", input="x" * 5000),
             dict(model="tiny-custom_voice", voice="vivian", input="Hi.", extra_body={"language": "klingon"}),
             dict(model="tiny-base", voice="unregistered", input="Hi.")]
    for case in cases:
        with pytest.raises(openai.BadRequestError):
            c.audio.speech.create(response_format="wav", **case)
    for model in ("tiny-custom_voice", "tiny-base"):  # no voice: said so, not "unknown voice 'None'"
        r = httpx.post(f"{server.url}/v1/audio/speech", json={"model": model, "input": "Hi."})
        assert r.status_code == 400 and r.json()["error"]["param"] == "voice", r.text
        assert r.json()["error"]["message"].startswith("voice is required"), r.text


def test_models_list_the_speech_models_with_their_voices(server: BackgroundServer) -> None:
    c = client(server)
    cards = {m.id: m.model_dump() for m in c.models.list()}
    assert set(cards) == {"tiny-custom_voice", "tiny-base", "tiny-voice_design"}
    assert all(card["capabilities"] == ["speech"] for card in cards.values())
    assert sorted(cards["tiny-custom_voice"]["voices"]) == ["eric", "vivian"]
    assert cards["tiny-voice_design"]["voices"] == ["default"]
    assert cards["tiny-base"]["voices"] is None  # its voices are the clones registered on it
    assert c.models.retrieve("tiny-custom_voice").id == "tiny-custom_voice"


def test_register_a_voice_and_speak_with_it(server: BackgroundServer) -> None:
    clip = encode_whole(__import__("torch").from_numpy(recipe.reference_clip()), 24000, "wav")
    r = httpx.post(f"{server.url}/v1/audio/voices", data={"model": "tiny-base", "name": "alice"},
                   files={"file": ("ref.wav", clip, "audio/wav")}, timeout=60)
    assert r.status_code == 200, r.text
    bad = httpx.post(f"{server.url}/v1/audio/voices", data={"model": "tiny-base", "name": "bob"},
                     files={"file": ("ref.wav", b"not audio at all", "audio/wav")}, timeout=60)
    assert bad.status_code == 400 and "decoded" in bad.json()["error"]["message"]
    assert "BytesIO" not in bad.json()["error"]["message"]
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


def test_voice_registration_refusals(server: BackgroundServer) -> None:
    """A clip of NaN samples, an over-limit upload and a bad name are 400s naming the field; nothing is saved."""
    url = f"{server.url}/v1/audio/voices"
    nan = io.BytesIO()
    soundfile.write(nan, [float("nan")] * 24000, 24000, format="WAV", subtype="FLOAT")
    r = httpx.post(url, data={"model": "tiny-base", "name": "nan"}, files={"file": ("nan.wav", nan.getvalue())},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    huge = b"RIFF" + b"\0" * (server.server.config.app.state.qwenstack.config.max_audio_bytes + 1)
    r = httpx.post(url, data={"model": "tiny-base", "name": "huge"}, files={"file": ("huge.wav", huge)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    clip = encode_whole(__import__("torch").from_numpy(recipe.reference_clip()), 24000, "wav")
    for name in ("../evil", "eve\n"):
        r = httpx.post(url, data={"model": "tiny-base", "name": name}, files={"file": ("ref.wav", clip)}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    ids = {v["id"] for v in httpx.get(url, params={"model": "tiny-base"}).json()["data"]}
    assert not ids & {"nan", "huge"}


def test_a_speech_model_named_where_a_language_model_is_wanted_says_what_it_is(server: BackgroundServer) -> None:
    """It is listed in /v1/models, so "does not exist" (what this said) sent users looking for a typo."""
    sdk = client(server)
    assert "tiny-custom_voice" in {m.id for m in sdk.models.list().data}
    with pytest.raises(openai.NotFoundError, match="'tiny-custom_voice' is a speech model: it does not serve"):
        sdk.chat.completions.create(model="tiny-custom_voice", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError, match="is a speech model"):
        sdk.audio.transcriptions.create(model="tiny-custom_voice", file=("a.wav", b"RIFF"))
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
