"""Speech through the OpenAI-compatible server, driven by the official `openai` SDK: transcriptions in every
response_format and streamed, a long file cut into timed segments, a random Qwen3-ASR whose transcript
equals transformers' greedy tokens, audio parts in chat, and every refusal a 400 (corrupt, too large, too
long, bad fields, a text-only model, translation)."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import openai
import pytest
import torch

from asr_checkpoints import build_asr_checkpoint, build_scripted_asr, load_hf_asr, speechlike, tone, wav_bytes
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.audio.asr import max_transcript_tokens, parse_asr_output
from qwenstack.engine.engine import EngineConfig
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import build_served_model
from qwenstack.tokenizer import Tokenizer


ANSWER = "hello there, this is a test."
MAX_BYTES, MAX_SECONDS = 4_000_000, 100.0
CLIP = wav_bytes(speechlike(2.0, seed=1))


def _served(name: str, path: Path):
    return build_served_model(name, load_model(path, dtype=torch.float32), Tokenizer.from_dir(path),
                              EngineConfig(block_size=8, kv_cache_memory=2**24),
                              hf_config=json.loads((path / "config.json").read_text()), model_dir=path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"scripted": build_scripted_asr(tmp_path_factory.mktemp("asr-scripted"), "language English<asr_text>"
                                           + ANSWER),
            "random": build_asr_checkpoint(tmp_path_factory.mktemp("asr-random"), tie=True, seed=7)}


@pytest.fixture(scope="module")
def server(paths: dict[str, Path], tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(enable_ui=False, max_audio_bytes=MAX_BYTES, max_audio_seconds=MAX_SECONDS)
    served = [_served("asr", paths["scripted"]), _served("asr-random", paths["random"]), tiny_served_model(tiny_qwen3)]
    with BackgroundServer(create_app(served, config)) as srv:
        srv.served = {s.name: s for s in served}  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_transcription_json_and_text(client: openai.OpenAI) -> None:
    out = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr")
    assert out.text == ANSWER
    usage = out.usage.model_dump()
    assert usage["type"] == "tokens" and usage["seconds"] == 2.0
    assert usage["input_token_details"]["audio_tokens"] == 26 and usage["output_tokens"] > 0
    text = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", response_format="text")
    assert text.strip() == ANSWER


def test_transcription_verbose_srt_vtt(client: openai.OpenAI) -> None:
    verbose = client.audio.transcriptions.create(file=("clip.flac", wav_bytes(speechlike(2.0), fmt="FLAC")),
                                                 model="asr", response_format="verbose_json")
    assert (verbose.text, verbose.language, verbose.duration) == (ANSWER, "english", 2.0)
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, 2.0, ANSWER)]
    srt = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", response_format="srt")
    assert srt == f"1\n00:00:00,000 --> 00:00:02,000\n{ANSWER}\n"
    vtt = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", response_format="vtt")
    assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n{ANSWER}\n"
    # OpenAI's timestamp_granularities: segments are what verbose_json has; word times do not exist, said so
    timed = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", response_format="verbose_json",
                                               timestamp_granularities=["segment"])
    assert [(s.start, s.end) for s in timed.segments] == [(0.0, 2.0)]
    for granularities, fmt, message in ((["word"], "verbose_json", "word timestamps are not available"),
                                        (["segment"], "json", "needs response_format verbose_json")):
        with pytest.raises(openai.BadRequestError) as info:
            client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", response_format=fmt,
                                               timestamp_granularities=granularities)
        body: Any = info.value.body
        assert body["param"] == "timestamp_granularities" and message in body["message"]


def test_long_file_is_cut_at_silences_into_timed_segments(client: openai.OpenAI) -> None:
    # 70 s of steady sound with a silent gap at 25-26 s and 53-54 s, where the cuts must go
    samples = tone(70.0, 300.0, amplitude=0.3) + 0.05 * np.random.default_rng(3).standard_normal(70 * 16000)
    for gap in (25.0, 53.0):
        samples[int(gap * 16000):int((gap + 1.0) * 16000)] = 0
    verbose = client.audio.transcriptions.create(file=("long.wav", wav_bytes(samples)), model="asr",
                                                 response_format="verbose_json")
    bounds = [(s.start, s.end) for s in verbose.segments]
    assert len(bounds) == 3 and bounds[0][0] == 0.0 and bounds[-1][1] == 70.0
    assert 25.0 <= bounds[0][1] <= 26.0 and 53.0 <= bounds[1][1] <= 54.0
    assert verbose.text == " ".join([ANSWER] * 3)


def test_verbose_segments_seek_is_the_start_in_hundredths(client: openai.OpenAI) -> None:
    """seek was int(start * 100): a cut at 80.35 s (8034.999...) said 8034."""
    verbose = client.audio.transcriptions.create(file=("long.wav", wav_bytes(speechlike(95.0, seed=3))),
                                                 model="asr", response_format="verbose_json")
    assert 80.35 in [s.start for s in verbose.segments]
    assert [s.seek for s in verbose.segments] == [round(s.start * 100) for s in verbose.segments]


def test_transcription_stream(client: openai.OpenAI) -> None:
    events = list(client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) > 1 and "".join(deltas) == ANSWER  # the language header never reaches the client
    assert len(done) == 1 and done[0].text == ANSWER and done[0].usage.output_tokens > 0
    assert events[-1].type == "transcript.text.done"


def test_random_model_transcript_equals_transformers(client: openai.OpenAI, server, paths) -> None:
    """No script: the forced-language prompt with context, generated greedily, equals transformers."""
    samples = speechlike(3.1, seed=9)
    prompter = server.served["asr-random"].asr
    clip = prompter.clip(samples)
    ids = prompter.prompt_ids(clip, "names: Qwen", "English")
    hf = load_hf_asr(paths["random"])
    from asr_checkpoints import hf_features

    features, mask = hf_features(samples)
    want = hf.generate(input_ids=torch.tensor([ids]), input_features=features, input_features_mask=mask,
                       max_new_tokens=max_transcript_tokens(3.1), do_sample=False, eos_token_id=[151645, 151643],
                       pad_token_id=0)[0, len(ids):].tolist()
    text = prompter.tokenizer.decode([t for t in want if t not in (151645, 151643)], skip_special_tokens=True)
    expected = parse_asr_output(text, "English").text
    for stream in (False, True):
        out = client.audio.transcriptions.create(file=("x.wav", wav_bytes(samples)), model="asr-random",
                                                 language="en", prompt="names: Qwen", temperature=0.0, stream=stream)
        got = out.text if not stream else [e for e in out if e.type == "transcript.text.done"][0].text
        assert got == expected


def _hf_greedy(paths, prompter, samples: np.ndarray, ids: list[int], seconds: float) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens for the prompt and each one's logprob, in float32 (the eos included)."""
    from asr_checkpoints import hf_features

    features, mask = hf_features(samples)
    out = load_hf_asr(paths["random"]).generate(
        input_ids=torch.tensor([ids]), input_features=features, input_features_mask=mask,
        max_new_tokens=max_transcript_tokens(seconds), do_sample=False, eos_token_id=[151645, 151643], pad_token_id=0,
        output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]


def test_logprobs_and_segment_scores_are_the_sampled_tokens(client: openai.OpenAI, server, paths) -> None:
    """include[]=logprobs gives the transcript tokens' logprobs, and verbose_json's avg_logprob their mean (the end
    token counted, as whisper counts its EOT): both equal transformers' float32 logprobs of the same greedy tokens.
    The values were placeholders (no logprobs, avg_logprob 0.0, compression_ratio 0.0)."""
    import zlib

    samples = speechlike(3.1, seed=9)
    prompter = server.served["asr-random"].asr
    ids = prompter.prompt_ids(prompter.clip(samples), "names: Qwen", "English")
    tokens, logprobs = _hf_greedy(paths, prompter, samples, ids, 3.1)
    text_tokens = [t for t in tokens if t not in (151645, 151643)]
    ask = dict(file=("x.wav", wav_bytes(samples)), model="asr-random", language="en", prompt="names: Qwen")
    out = client.audio.transcriptions.create(**ask, include=["logprobs"])
    assert out.logprobs is not None and len(out.logprobs) == len(text_tokens)
    assert [lp.logprob for lp in out.logprobs] == pytest.approx(logprobs[:len(text_tokens)], abs=1e-3)
    assert [lp.token for lp in out.logprobs] == [prompter.tokenizer.decode([t]) for t in text_tokens]
    assert bytes(int(b) for lp in out.logprobs for b in lp.bytes).decode("utf-8", "replace").strip() == out.text
    verbose = client.audio.transcriptions.create(**ask, response_format="verbose_json")
    segment = verbose.segments[0]
    assert segment.tokens == text_tokens and segment.text == out.text
    assert segment.avg_logprob == pytest.approx(sum(logprobs) / len(logprobs), abs=1e-3) and segment.avg_logprob < 0
    raw = segment.text.encode()
    assert segment.compression_ratio == pytest.approx(len(raw) / len(zlib.compress(raw))) and raw
    assert segment.no_speech_prob == 0.0
    # streamed: each delta carries its tokens' logprobs, the done event all of them
    events = list(client.audio.transcriptions.create(**ask, include=["logprobs"], stream=True))
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == out.text
    assert [lp.logprob for lp in done.logprobs] == pytest.approx([lp.logprob for lp in out.logprobs], abs=1e-5)
    streamed = [lp for e in events if e.type == "transcript.text.delta" for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in done.logprobs]


def test_transcript_start_is_after_the_language_header(server) -> None:
    """The released vocabulary has `<asr_text>` as one token: the transcript starts after it. The scripted model's
    vocabulary has a token that runs on past it (` English<asr_text>hello`): that token carries transcript text."""
    random_asr, scripted = server.served["asr-random"].asr, server.served["asr"].asr
    ids = random_asr.tokenizer.encode("language English<asr_text>hello there")
    start = ids.index(random_asr.tokenizer.token_to_id("<asr_text>")) + 1
    assert random_asr.transcript_start(ids, None) == start
    assert random_asr.tokenizer.decode(ids[start:]) == "hello there"
    assert random_asr.transcript_start(ids, "English") == 0  # the header was in the prompt: all answer is transcript
    assert random_asr.transcript_start(ids[:start - 1], None) == 0  # no marker: all transcript, as parse reads it
    piece = [t for t in range(scripted.tokenizer.backend.get_vocab_size())
             if scripted.tokenizer.decode([t]).endswith("<asr_text>hello")]
    assert len(piece) == 1 and scripted.transcript_start([5, piece[0], 7], None) == 1


def test_segment_scores_count_the_end_token_but_not_the_header(server) -> None:
    """whisper's avg_logprob averages the sampled tokens with the EOT that ended them (its language token is in the
    prompt): here the header's tokens are left out and the eos counted, while `tokens` and include[]'s logprobs are
    the transcript's alone. An answer cut by max_tokens has no end token to count."""
    from qwenstack.audio.asr import SegmentPrompt
    from qwenstack.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from qwenstack.engine.params import SamplingParams
    from qwenstack.engine.sequence import Logprob
    from qwenstack.serving.logprobs import TokenTexts
    from qwenstack.serving.transcriptions import TranscriptionRequest, _segment, _transcript_logprobs

    served = server.served["asr-random"]
    tok = served.tokenizer
    header, text = tok.encode("language English<asr_text>"), tok.encode("hi there")
    req = TranscriptionRequest(served, [SegmentPrompt(0.0, 2.0, None, [])], 2.0, None,  # type: ignore[arg-type]
                               "verbose_json", False, [SamplingParams(temperature=0.0)], logprobs=True)
    for ids, reason in ((header + text + [151645], "stop"), (header + text, "length")):
        values = [-0.5 * (i + 1) for i in range(len(ids))]
        comp = CompletionOutput(0, "", ids, finish_reason=reason,
                                logprobs=[{t: Logprob(v, 1)} for t, v in zip(ids, values)])
        final = RequestOutput("r", [], [comp], True, RequestMetrics(0.0, None, None, None, None, 0))
        segment = _segment(req, 0, parse_asr_output("language English<asr_text>hi there"), final)
        assert segment["tokens"] == text and segment["text"] == "hi there"
        assert segment["avg_logprob"] == pytest.approx(sum(values[len(header):]) / len(values[len(header):]))
        got = _transcript_logprobs(req, TokenTexts(tok), [final])
        assert [lp["logprob"] for lp in got] == values[len(header):len(header) + len(text)]


def test_logprobs_leave_out_the_language_header(client: openai.OpenAI, server) -> None:
    """The detected language's header (`language English<asr_text>`) is sampled but is no transcript: its tokens are
    in neither the logprobs nor a segment's tokens (but for the scripted vocabulary's token that runs on into the
    transcript); `include=logprobs` without brackets is read too."""
    import httpx

    header_end = " English<asr_text>"  # the head of the one token that straddles the marker (test above)

    def joined(logprobs) -> str:
        return bytes(int(b) for lp in logprobs for b in lp["bytes"]).decode()

    out = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", include=["logprobs"])
    assert joined([lp.model_dump() for lp in out.logprobs]) == header_end + ANSWER
    plain = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("clip.wav", CLIP)},
                       data={"model": "asr", "include": "logprobs"}).json()
    assert plain["logprobs"] == [lp.model_dump() for lp in out.logprobs]
    events = list(client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", include=["logprobs"],
                                                     stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert joined([lp.model_dump() for lp in deltas[0].logprobs]) == header_end + deltas[0].delta
    assert all(joined([lp.model_dump() for lp in e.logprobs]) == e.delta for e in deltas[1:])
    assert [lp.model_dump() for lp in events[-1].logprobs] == [lp.model_dump() for lp in out.logprobs]
    verbose = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr", response_format="verbose_json")
    assert server.served["asr"].tokenizer.decode(verbose.segments[0].tokens) == header_end + ANSWER
    assert verbose.segments[0].avg_logprob <= 0
    plain_answer = client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr")
    assert plain_answer.logprobs is None  # not asked for, not sent


def test_include_refusals_name_the_param(client: openai.OpenAI) -> None:
    """An unknown include value, or logprobs with a format that has no place for them (OpenAI: json only)."""
    t = client.audio.transcriptions.create
    for kwargs, message in (({"include": ["words"]}, "include takes 'logprobs'"),
                            ({"response_format": "verbose_json"}, "needs response_format json"),
                            ({"response_format": "text"}, "needs response_format json"),
                            ({"response_format": "text", "stream": True}, "needs response_format json")):
        with pytest.raises(openai.BadRequestError) as info:
            t(file=("x.wav", CLIP), model="asr", **{"include": ["logprobs"], **kwargs})
        body: Any = info.value.body
        assert body["param"] == "include" and message in body["message"]


def test_chat_with_input_audio_and_audio_url(client: openai.OpenAI) -> None:
    b64 = base64.b64encode(CLIP).decode()
    # Base64 as clients write it, accepted as for images: wrapped lines, padding stripped, the URL-safe alphabet.
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)).rstrip("=")
    url_safe = base64.urlsafe_b64encode(CLIP).decode().rstrip("=")
    for part in ({"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                 {"type": "input_audio", "input_audio": {"data": wrapped, "format": "wav"}},
                 {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + url_safe}},
                 {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + b64}}):
        out = client.chat.completions.create(model="asr", messages=[{"role": "user", "content": [part]}],
                                             temperature=0)
        assert out.choices[0].message.content == "language English<asr_text>" + ANSWER
        assert out.usage.prompt_tokens > 26  # the clip's 26 audio tokens are counted
    stream = client.chat.completions.create(model="asr", stream=True, temperature=0,
                                            messages=[{"role": "user", "content": [part]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        "language English<asr_text>" + ANSWER


def _bad(call, code: str | None, match: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.status_code == 400 and match in info.value.message
    if code is not None:
        assert info.value.code == code


def test_refusals_are_400(client: openai.OpenAI) -> None:
    t = client.audio.transcriptions.create
    _bad(lambda: t(file=("x.wav", b"RIFF....not really a wav file at all" * 4), model="asr"), "invalid_audio",
         "not audio")
    _bad(lambda: t(file=("x.txt", b"hello"), model="asr"), "invalid_audio", "not audio")
    with pytest.raises(openai.BadRequestError) as info:  # libsndfile's reason, not the repr of a buffer
        t(file=("x.mp3", b"\x89PNG\r\n\x1a\n" + b"0" * 500), model="asr")
    assert "Format not recognised" in info.value.message and "BytesIO" not in info.value.message
    _bad(lambda: t(file=("x.wav", b""), model="asr"), "invalid_audio", "empty")
    # a file part without a filename reaches the form as text: said so, not "'file' is required"
    _bad(lambda: t(file=("", CLIP), model="asr"), None, "file part with a filename")
    _bad(lambda: t(file=("x.wav", b"\0" * (MAX_BYTES + 1)), model="asr"), "invalid_audio", "over the limit")
    _bad(lambda: t(file=("x.wav", wav_bytes(np.zeros(int(101 * 8000), np.float32), 8000)), model="asr"),
         "invalid_audio", "over the limit of 100 s")
    _bad(lambda: t(file=("x.wav", CLIP), model="tiny"), "unsupported_content", "does not accept audio")
    _bad(lambda: t(file=("x.wav", CLIP), model="asr", response_format="xml"), None, "response_format")  # type: ignore[arg-type]
    _bad(lambda: t(file=("x.wav", CLIP), model="asr", language="klingon"), None, "klingon")
    # a prompt too long for the context, or holding the audio placeholder, is the prompt's fault, not the file's
    with pytest.raises(openai.BadRequestError) as info:
        t(file=("x.wav", CLIP), model="asr", prompt="word " * 5000)
    assert info.value.param == "prompt" and "the audio and the prompt need" in info.value.message  # type: ignore
    with pytest.raises(openai.BadRequestError) as info:
        t(file=("x.wav", CLIP), model="asr", prompt="<|audio_pad|>")
    assert info.value.param == "prompt" and "prompt: " in info.value.message  # type: ignore
    _bad(lambda: t(file=("x.wav", CLIP), model="asr", response_format="srt", stream=True), None, "stream")
    _bad(lambda: client.audio.translations.create(file=("x.wav", CLIP), model="asr"), "unsupported_task",
         "cannot translate")
    part = {"type": "input_audio", "input_audio": {"data": "%%%not base64%%%", "format": "wav"}}
    _bad(lambda: client.chat.completions.create(model="asr", messages=[{"role": "user", "content": [part]}]),
         "invalid_audio", "base64")
    ok = {"type": "input_audio", "input_audio": {"data": base64.b64encode(CLIP).decode(), "format": "wav"}}
    _bad(lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [ok]}]),
         "unsupported_content", "does not accept input_audio")
    url = {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}
    _bad(lambda: client.chat.completions.create(model="asr", messages=[{"role": "user", "content": [url]}]),
         "invalid_audio", "data: URL")
    # the server still answers after all of that
    assert client.audio.transcriptions.create(file=("clip.wav", CLIP), model="asr").text == ANSWER


def _encoded(container: str, codec: str, rate: int, samples: np.ndarray) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize("name, container, codec, rate", [("voice.m4a", "ipod", "aac", 44100),
                                                          ("mic.webm", "webm", "libopus", 48000),
                                                          ("clip.aac", "adts", "aac", 24000)])
def test_phone_and_browser_recordings_transcribe(client: openai.OpenAI, name: str, container: str, codec: str,
                                                 rate: int) -> None:
    """Formats OpenAI's transcription API takes that libsndfile does not read: an iPhone's M4A, a browser
    MediaRecorder's WebM/Opus, and the ADTS AAC that /v1/audio/speech itself returns."""
    data = _encoded(container, codec, rate, speechlike(2.0, seed=1, rate=rate))
    out = client.audio.transcriptions.create(file=(name, data), model="asr")
    assert out.text == ANSWER and abs(out.usage.seconds - 2.0) < 0.1  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as info:  # still bounded by the seconds limit
        client.audio.transcriptions.create(file=(name, _encoded(container, codec, rate, np.zeros(int(101 * rate)))),
                                           model="asr")
    assert "over the limit of 100 s" in info.value.message


def test_tone_and_silence_transcribe(client: openai.OpenAI) -> None:
    for samples in (tone(0.3), np.zeros(16000, np.float32)):  # under 0.5 s (padded) and silence
        assert client.audio.transcriptions.create(file=("t.wav", wav_bytes(samples)), model="asr").text == ANSWER


def test_input_audio_through_the_responses_api(client: openai.OpenAI) -> None:
    """/v1/responses: an input_audio part reaches the model as the same part of chat does."""
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(CLIP).decode(), "format": "wav"}}
    r = client.responses.create(model="asr", input=[{"role": "user", "content": [part]}], temperature=0)
    assert r.status == "completed" and r.output_text == "language English<asr_text>" + ANSWER
    chat = client.chat.completions.create(model="asr", messages=[{"role": "user", "content": [part]}], temperature=0)
    assert r.usage.input_tokens == chat.usage.prompt_tokens > 26  # the clip's 26 audio tokens are counted
