"""Qwen3-Omni through the OpenAI-compatible server with the official `openai` SDK: text + audio answers
(non-streamed and streamed), audio and image inputs, a text-only request that skips the Talker, and the 400s.
The tiny checkpoint is random, so what is checked is the shape and the arithmetic: the pcm decodes, its
length is what the codes give, and the streamed audio equals the one-shot speech of the same answer."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import openai
import pytest
import soundfile
import torch

from asr_checkpoints import speechlike, wav_bytes
from omni_checkpoints import build_omni_checkpoint
from server_utils import BackgroundServer
from vl_checkpoints import data_url, noise_image
from qwenstack.audio.omni_speech import AnswerSpeech
from qwenstack.engine.engine import EngineConfig
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import build_served_model
from qwenstack.tokenizer import Tokenizer

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # ~90 s on 2 cores: a tiny Omni server and several spoken answers

AUDIO = {"voice": "Ethan", "format": "pcm16"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    path = build_omni_checkpoint(tmp_path_factory.mktemp("omni"), seed=5)
    served = build_served_model("omni", load_model(path, dtype=torch.float32), Tokenizer.from_dir(path),
                                EngineConfig(block_size=8, kv_cache_memory=2**24),
                                hf_config=json.loads((path / "config.json").read_text()), model_dir=path)
    with BackgroundServer(create_app([served], ServerConfig(enable_ui=False))) as srv:
        srv.served = served  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0


def _expected_length(server: BackgroundServer, frames: int) -> int:
    c2w = server.served.engine.engine.model.code2wav  # type: ignore[attr-defined]
    return frames * c2w.samples_per_frame - c2w.tail if frames else 0


def test_non_streamed_text_and_wav_audio(client: openai.OpenAI, server: BackgroundServer) -> None:
    out = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Say hello."}],
                                         modalities=["text", "audio"], audio={"voice": "ethan", "format": "wav"},
                                         max_tokens=6, temperature=0)
    message = out.choices[0].message
    assert message.content is None and message.audio is not None
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > 0
    assert message.audio.transcript  # the answer's text
    wav, rate = soundfile.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    tail = server.served.engine.engine.model.code2wav.tail  # type: ignore[attr-defined]
    assert rate == 24000 and wav.size > 0 and (wav.size + tail) % 1920 == 0  # whole frames, less the fixed tail


def test_streamed_audio_arrives_with_the_text_and_equals_one_shot(client: openai.OpenAI,
                                                                  server: BackgroundServer) -> None:
    stream = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Tell me more."}],
                                            modalities=["text", "audio"], audio=AUDIO, max_tokens=12,
                                            temperature=0, stream=True)
    pcm, transcript, order, expiry = b"", "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        audio = getattr(delta, "audio", None)
        if delta.content:
            order.append("text")
        if audio:
            audio = audio if isinstance(audio, dict) else audio.model_dump()
            if audio.get("data"):
                pcm += base64.b64decode(audio["data"])
                order.append("audio")
            transcript += audio.get("transcript") or ""
            expiry = audio.get("expires_at", expiry)
    assert pcm and expiry is not None
    # audio started before the last text delta: speech streams while the text is written
    assert "audio" in order and order.index("audio") < len(order) - 1 - order[::-1].index("text")
    # the same request answered in one piece (greedy Thinker and Talker) gives the same samples
    whole = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Tell me more."}],
                                           modalities=["text", "audio"], audio=AUDIO, max_tokens=12, temperature=0)
    assert whole.choices[0].message.audio.transcript == transcript
    one_shot = _samples(base64.b64decode(whole.choices[0].message.audio.data))
    got = _samples(pcm)
    tail = server.served.engine.engine.model.code2wav.tail  # type: ignore[attr-defined]
    assert got.size == one_shot.size and (got.size + tail) % 1920 == 0
    np.testing.assert_allclose(got, one_shot, atol=1.5 / 32767)  # pcm16 rounding


def test_audio_and_image_inputs_with_audio_output(client: openai.OpenAI) -> None:
    clip = base64.b64encode(wav_bytes(speechlike(1.2, seed=3))).decode()
    content = [{"type": "text", "text": "What do you hear and see?"},
               {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
               {"type": "image_url", "image_url": {"url": data_url(noise_image(64, 48, seed=2))}}]
    out = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": content}],
                                         modalities=["text", "audio"], audio=AUDIO, max_tokens=5, temperature=0)
    assert out.usage.prompt_tokens > 30  # the audio and image placeholders were expanded
    assert out.choices[0].message.audio is not None and base64.b64decode(out.choices[0].message.audio.data)


def test_text_only_request_skips_the_talker(client: openai.OpenAI, server: BackgroundServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the Talker ran for a text-only request")

    monkeypatch.setattr(AnswerSpeech, "feed", refuse)
    out = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         temperature=0)
    assert out.choices[0].message.content is not None and out.choices[0].message.audio is None
    out = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         modalities=["text"], temperature=0)
    assert out.choices[0].message.audio is None


@pytest.mark.parametrize("audio, stream, param", [
    ({"voice": "alloy", "format": "pcm16"}, False, "audio.voice"),
    ({"voice": "ethan", "format": "mp3"}, False, "audio.format"),
    ({"voice": "ethan", "format": "wav"}, True, "audio.format"),
    (None, False, "audio"),
])
def test_bad_audio_requests_are_400(client: openai.OpenAI, audio, stream: bool, param: str) -> None:
    kwargs = {"audio": audio} if audio is not None else {}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Hi"}],
                                       modalities=["text", "audio"], max_tokens=2, stream=stream, **kwargs)
    assert err.value.body["param"] == param  # type: ignore[index]
