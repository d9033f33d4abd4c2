"""Qwen3-Omni through the OpenAI-compatible server with the official `openai` SDK: text + audio answers
(non-streamed and streamed), audio and image inputs, a text-only request that skips the Talker, and the 400s
(the no-Talker one called directly: it needs a second checkpoint otherwise).
The tiny checkpoint is random, so what is checked is the shape and the arithmetic: the pcm decodes, its
length is what the codes give, and the streamed audio equals the one-shot speech of the same answer.

Its random Talker never says EOS, so every reply runs into the server's speech limits, which makes their
arithmetic exact: one frame per spoken token plus a 5-frame tail, and never more than 2 s (25 frames)."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import openai
import pytest
import soundfile
import torch
from openai.types.chat import ChatCompletion

from asr_checkpoints import speechlike, wav_bytes
from server_utils import BackgroundServer, wait_idle
from vl_checkpoints import data_url, noise_image
from qwenstack.audio.omni_speech import AnswerSpeech
from qwenstack.engine.engine import EngineConfig
from qwenstack.models.qwen3_omni_moe_talker import SpokenAnswer
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import build_served_model
from qwenstack.tokenizer import Tokenizer

FRAME_S = 0.08  # one Talker frame: 1920 samples at 24 kHz
TAIL_FRAMES = 5
CAP_FRAMES = 25

AUDIO = {"voice": "Ethan", "format": "pcm16"}


@pytest.fixture(scope="module")
def server(native_omni: Path) -> Iterator[BackgroundServer]:
    path = native_omni
    served = build_served_model("omni", load_model(path, dtype=torch.float32), Tokenizer.from_dir(path),
                                EngineConfig(block_size=8, kv_cache_memory=2**24),
                                hf_config=json.loads((path / "config.json").read_text()), model_dir=path)
    config = ServerConfig(enable_ui=False, speech_seconds_per_token=FRAME_S, speech_tail_seconds=TAIL_FRAMES * FRAME_S,
                          max_speech_seconds=CAP_FRAMES * FRAME_S)
    with BackgroundServer(create_app([served], config)) as srv:
        srv.served = served  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0


def _frames(server: BackgroundServer, samples: int) -> int:
    """Talker frames a decoded waveform holds: T frames give T * 1920 - tail samples."""
    c2w = server.served.engine.engine.model.code2wav  # type: ignore[attr-defined]
    frames, rest = divmod(samples + c2w.tail, c2w.samples_per_frame)
    assert rest == 0, f"{samples} samples are not a whole number of frames"
    return frames


def _spoken_frames(completion_tokens: int) -> int:
    """The limits' arithmetic: one frame per answer token plus the tail, at most the cap (the test template
    puts nothing after the assistant head, and a random Thinker never ends on EOS within a few tokens)."""
    return min(completion_tokens + TAIL_FRAMES, CAP_FRAMES)


def _ask(client: openai.OpenAI, text: str, **kwargs) -> ChatCompletion:
    return client.chat.completions.create(model="omni", messages=[{"role": "user", "content": text}],
                                          modalities=["text", "audio"], temperature=0, **kwargs)


def test_non_streamed_text_and_wav_audio(client: openai.OpenAI, server: BackgroundServer) -> None:
    out = _ask(client, "Say hello.", audio={"voice": "ethan", "format": "wav"}, max_tokens=6)
    message = out.choices[0].message
    assert message.content is None and message.audio is not None
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > 0
    assert message.audio.transcript  # the answer's text
    wav, rate = soundfile.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == 24000 and np.abs(wav).max() > 0
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    # the Talker stopped a tail after the text, not at transformers' 4096 frames
    assert _frames(server, wav.size) == _spoken_frames(6) == 11


def test_long_answer_is_cut_at_max_speech_seconds(client: openai.OpenAI, server: BackgroundServer) -> None:
    out = _ask(client, "Tell me everything.", audio=AUDIO, max_tokens=30)
    pcm = base64.b64decode(out.choices[0].message.audio.data)
    assert out.usage.completion_tokens == 30
    assert _frames(server, len(pcm) // 2) == CAP_FRAMES  # 30 + 5 frames allowed by the text, 25 by the cap


def test_streamed_audio_arrives_with_the_text_and_equals_one_shot(client: openai.OpenAI,
                                                                  server: BackgroundServer) -> None:
    stream = _ask(client, "Tell me more.", audio=AUDIO, max_tokens=12, stream=True)
    pcm, transcript, order, expiry = b"", "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        audio = getattr(delta, "audio", None)
        assert not delta.content  # the text is the transcript only, as the unstreamed message has content null
        if audio:
            audio = audio if isinstance(audio, dict) else audio.model_dump()
            if audio.get("transcript"):
                order.append("text")
            if audio.get("data"):
                pcm += base64.b64decode(audio["data"])
                order.append("audio")
            transcript += audio.get("transcript") or ""
            expiry = audio.get("expires_at", expiry)
    assert pcm and expiry is not None
    # audio started before the last text delta: speech streams while the text is written
    last_text = len(order) - 1 - order[::-1].index("text")
    assert "audio" in order and order.index("audio") < last_text
    # what the Talker says after the text (17 frames for 12 tokens, ~10 spoken by then) comes chunk by chunk
    assert order[last_text + 1:].count("audio") >= 2
    got = _samples(pcm)
    assert _frames(server, got.size) == _spoken_frames(12)
    # the same request answered in one piece (greedy Thinker and Talker) gives the same samples
    whole = _ask(client, "Tell me more.", audio=AUDIO, max_tokens=12)
    assert whole.choices[0].message.audio.transcript == transcript
    one_shot = _samples(base64.b64decode(whole.choices[0].message.audio.data))
    assert got.size == one_shot.size
    np.testing.assert_allclose(got, one_shot, atol=1.5 / 32767)  # pcm16 rounding


def test_audio_and_image_inputs_with_audio_output(client: openai.OpenAI, server: BackgroundServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = server.served.engine.engine.model  # type: ignore[attr-defined]
    calls = {"encode_images": 0, "encode_audio": 0}
    for name in calls:
        def counted(items, _name=name, _encode=getattr(model, name)):
            calls[_name] += 1
            return _encode(items)

        monkeypatch.setattr(model, name, counted)
    clip = base64.b64encode(wav_bytes(speechlike(1.2, seed=3))).decode()
    content = [{"type": "text", "text": "What do you hear and see?"},
               {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
               {"type": "image_url", "image_url": {"url": data_url(noise_image(64, 48, seed=2))}}]
    text_only = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": content[:1]}],
                                               max_tokens=1)
    out = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": content}],
                                         modalities=["text", "audio"], audio=AUDIO, max_tokens=5, temperature=0)
    # 1.2 s of audio is 16 placeholders; 64x48 pixels resize to 64x64 (multiples of 32), 4x4 patches merged 2x2
    # into 4; plus each one's start and end token
    assert out.usage.prompt_tokens - text_only.usage.prompt_tokens == 16 + 4 + 2 * 2
    pcm = base64.b64decode(out.choices[0].message.audio.data)
    assert _frames(server, len(pcm) // 2) == _spoken_frames(5)
    # the engine's prefill encoded the clip and the image; the speech path took them from its encoder cache
    assert calls == {"encode_images": 1, "encode_audio": 1}


def test_text_only_request_never_builds_a_talker(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a speech session was built for a text-only request")

    monkeypatch.setattr(AnswerSpeech, "__init__", refuse)
    monkeypatch.setattr(SpokenAnswer, "__init__", refuse)
    for modalities in (openai.NOT_GIVEN, ["text"]):
        out = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=4, modalities=modalities, temperature=0)
        assert out.choices[0].message.content and out.choices[0].message.audio is None


@pytest.mark.parametrize("audio, stream, n, param", [
    ({"voice": "alloy", "format": "pcm16"}, False, 1, "audio.voice"),
    ({"voice": "ethan", "format": "mp3"}, False, 1, "audio.format"),
    ({"voice": "ethan", "format": "wav"}, True, 1, "audio.format"),
    (None, False, 1, "audio"),
    ({"voice": "ethan", "format": "pcm16"}, False, 2, "n"),
])
def test_bad_audio_requests_are_400(client: openai.OpenAI, audio, stream: bool, n: int, param: str) -> None:
    kwargs = {"audio": audio} if audio is not None else {}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "Hi"}],
                                       modalities=["text", "audio"], max_tokens=2, stream=stream, n=n, **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param  # type: ignore[index]


def test_audio_from_a_model_without_talker_is_400() -> None:
    """A Thinking/Captioner checkpoint (enable_audio_output false) refuses audio output before anything runs."""
    from types import SimpleNamespace

    from qwenstack.serving.chat_audio import start_audio
    from qwenstack.serving.errors import APIError
    from qwenstack.serving.protocol import ChatCompletionRequest

    served = SimpleNamespace(name="thinking", engine=SimpleNamespace(engine=SimpleNamespace(
        model=SimpleNamespace(has_talker=False))))
    request = ChatCompletionRequest(model="thinking", messages=[{"role": "user", "content": "Hi"}],
                                    modalities=["text", "audio"], audio={"voice": "ethan", "format": "wav"})
    with pytest.raises(APIError) as err:
        start_audio(served, request, [1, 2], None, ServerConfig())
    assert err.value.status == 400 and err.value.param == "modalities"
    text_only = request.model_copy(update={"modalities": ["text"]})
    assert start_audio(served, text_only, [1, 2], None, ServerConfig()) is None


def test_concurrent_spoken_answers_equal_each_alone(client: openai.OpenAI) -> None:
    """Three spoken replies at once (greedy and seeded) share the model's one batched Talker stage and each
    gets the audio it gets alone."""
    asks = [("Say one thing.", {}), ("Say another.", {"temperature": 0.8, "seed": 3}),
            ("And a third.", {"temperature": 0.8, "seed": 4})]

    def ask(text: str, extra: dict) -> tuple[str, np.ndarray]:
        kwargs = {"temperature": 0, **extra}
        out = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": text}],
                                             modalities=["text", "audio"], audio=AUDIO, max_tokens=8, **kwargs)
        audio = out.choices[0].message.audio
        return audio.transcript, _samples(base64.b64decode(audio.data))

    alone = [ask(text, extra) for text, extra in asks]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda a: ask(*a), asks))
    for (t1, s1), (t2, s2) in zip(alone, together):
        assert t1 == t2 and s1.size == s2.size > 0
        np.testing.assert_allclose(s2, s1, atol=1.5 / 32767)  # pcm16 rounding
    assert not np.array_equal(together[1][1], together[2][1])  # the seeds differ


def test_cancelled_stream_frees_the_talker(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that leaves mid-answer: the Thinker request is aborted and the Talker stage drops its answer
    and frees its KV blocks.
    The Talker is held from the step after its first audio until the server withdraws the answer, so the answer
    is surely still being spoken when the client leaves (unheld, a fast machine speaks all 25 frames before the
    client reads the first chunk) and it cannot end by itself before the withdrawal."""
    stage = server.served.speech_stage  # type: ignore[attr-defined]
    talker = stage.engine
    total = talker.blocks.num_blocks
    spoke, held, release = threading.Event(), threading.Event(), threading.Event()
    step = talker.step

    def held_step() -> list:
        if spoke.is_set() and not release.is_set():
            held.set()
            release.wait(30)
        chunks = step()
        if any(c.samples.numel() for c in chunks):
            spoke.set()
        return chunks

    abort = stage.abort
    aborted: list[str] = []

    def abort_and_release(request_id: str) -> None:  # the server withdraws the answer: let the Talker go on
        aborted.append(request_id)
        abort(request_id)
        release.set()

    monkeypatch.setattr(talker, "step", held_step)
    monkeypatch.setattr(stage, "abort", abort_and_release)
    body = {"model": "omni", "messages": [{"role": "user", "content": "Talk for a long time."}], "stream": True,
            "modalities": ["text", "audio"], "audio": AUDIO, "max_tokens": 30, "temperature": 0}
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"data"' in line and '"audio"' in line:  # the first audio chunk
                    assert held.wait(30)
                    assert talker.running and talker.blocks.num_free_blocks < total  # mid-answer, holding KV
                    break  # leaving the loop closes the connection: the client has gone
    except BaseException:
        release.set()
        raise
    assert release.wait(20) and len(aborted) == 1  # the server withdrew the answer from the Talker
    assert wait_idle(server.served.engine.engine)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while (talker.running or talker.waiting or talker.blocks.num_free_blocks < total) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not talker.running and not talker.waiting and talker.blocks.num_free_blocks == total


def test_transcription_asks_omni_in_words(client: openai.OpenAI, server: BackgroundServer) -> None:
    """/v1/audio/transcriptions on Qwen3-Omni: Qwen3-ASR's bare prompt (no instruction, a `language X<asr_text>`
    header) made Omni answer the audio instead of transcribing it; it is asked as a user would ask it in chat,
    and its whole answer is the transcript, streamed as it comes."""
    prompter = server.served.asr  # type: ignore[attr-defined]
    assert "Transcribe the English audio into text." in prompter.prompt_text("", "English")
    assert "<asr_text>" not in prompter.prompt_text("", "English")
    clip = wav_bytes(speechlike(1.0, seed=3))
    seconds = 1.0
    text = client.audio.transcriptions.create(file=("clip.wav", clip), model="omni", temperature=0).text
    b64 = base64.b64encode(clip).decode()
    chat = client.chat.completions.create(
        model="omni", temperature=0, max_tokens=32 + int(20 * seconds),
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                                               {"type": "text", "text": "Transcribe the audio into text."}]}])
    assert text == (chat.choices[0].message.content or "").strip()
    stream = client.audio.transcriptions.create(file=("clip.wav", clip), model="omni", temperature=0, stream=True)
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert "".join(deltas).strip() == text and (len(deltas) > 1 or len(text.split()) < 2)


def test_transcription_logprobs_equal_chats_for_the_same_prompt(client: openai.OpenAI) -> None:
    """include[]=logprobs on Omni (no language header: its whole answer is transcript) gives the logprobs chat gives
    for the same words, bar chat's end token (no transcript text)."""
    clip = wav_bytes(speechlike(1.0, seed=3))
    out = client.audio.transcriptions.create(file=("clip.wav", clip), model="omni", temperature=0,
                                             include=["logprobs"])
    b64 = base64.b64encode(clip).decode()
    chat = client.chat.completions.create(
        model="omni", temperature=0, max_tokens=32 + 20, logprobs=True,
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                                               {"type": "text", "text": "Transcribe the audio into text."}]}])
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    ended = chat.choices[0].finish_reason == "stop"
    assert out.logprobs is not None and len(out.logprobs) == len(content) - ended > 0
    assert [lp.token for lp in out.logprobs] == [c.token for c in content[:len(out.logprobs)]]
    assert [lp.logprob for lp in out.logprobs] == pytest.approx([c.logprob for c in content[:len(out.logprobs)]],
                                                                abs=1e-5)
