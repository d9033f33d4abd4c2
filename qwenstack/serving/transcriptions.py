"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart, OpenAI's shape).

Decisions:
- The upload is decoded (any format libsndfile reads), cut at silences into segments of at most 30 s,
  and every segment goes to the engine at once, so a long file's segments run as one batch. The segments
  are the timestamps of verbose_json, srt and vtt (Qwen3-ASR has no timestamp tokens of its own).
- `language` forces the language (written into the prompt as the model's own header), `prompt` is the
  context the model was trained to take as its system message, `temperature` 0 (the default) is greedy.
- `stream=true` answers Server-Sent Events `transcript.text.delta {delta}` and one
  `transcript.text.done {text, usage}`; the language header never reaches the client. Segments stream in
  order (later ones finish in the background meanwhile). A failure after the 200 is an in-band error frame.
- `timestamp_granularities` ["segment"] is verbose_json's segments; ["word"] is a 400 (no word times exist).
- usage counts tokens (OpenAI's `tokens` variant, audio and text input tokens apart) and adds `seconds`,
  the decoded duration.
- A transcript is bounded by max_transcript_tokens(segment seconds): a model that never stops cannot run to
  the context limit.
- Translation: no served model translates speech yet (Qwen3-ASR transcribes only), so the route answers a
  400 naming the model rather than silently transcribing.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile

from qwenstack.audio.asr import (
    SegmentPrompt, language_code, language_name, max_transcript_tokens,
    segment_prompts,
)
from qwenstack.audio.subtitles import to_srt, to_vtt
from qwenstack.engine.outputs import RequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.multimodal.inputs import MultimodalInputs
from qwenstack.serving.audio import decode_upload, require_audio_model
from qwenstack.serving.errors import APIError, bad_request, error_frame, from_exception
from qwenstack.serving.openapi import form_body
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import get_state
from qwenstack.serving.streaming import ClosingStreamingResponse, OutputStream, first_output, sse

router = APIRouter()

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
SEGMENT_SECONDS = 30.0


@dataclass
class TranscriptionRequest:
    served: ServedModel
    segments: list[SegmentPrompt]
    seconds: float
    language: str | None  # forced language (Qwen's name), None to detect
    response_format: str
    stream: bool
    params: list[SamplingParams]


def _field(form: Any, name: str, default: str | None = None) -> str | None:
    value = form.get(name)
    if value is None:
        return default
    if isinstance(value, UploadFile):
        raise bad_request(f"'{name}' must be a form field, not a file", param=name)
    return str(value)


def _check_granularities(form: Any, response_format: str) -> None:
    """OpenAI's timestamp_granularities (the SDK sends `timestamp_granularities[]`): segment times are what
    verbose_json gives; word times Qwen3-ASR does not produce, so asking for them is a 400, not a silent omission."""
    asked = [str(v) for name in ("timestamp_granularities[]", "timestamp_granularities") for v in form.getlist(name)]
    if not asked:
        return
    unknown = [g for g in asked if g not in ("word", "segment")]
    if unknown:
        raise bad_request(f"timestamp_granularities takes 'word' and 'segment', got '{unknown[0]}'",
                          param="timestamp_granularities")
    if response_format != "verbose_json":
        raise bad_request("timestamp_granularities needs response_format verbose_json",
                          param="timestamp_granularities")
    if "word" in asked:
        raise bad_request("word timestamps are not available: Qwen3-ASR gives segment times only (ask for "
                          "timestamp_granularities ['segment'])", param="timestamp_granularities")


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.strip().lower() in ("", "false", "0", "no"):
        return False
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    raise bad_request(f"'{name}' must be true or false, got '{value}'", param=name)


async def _form_and_model(request: Request) -> tuple[Any, ServedModel]:
    """The multipart form and the audio model it names (400 for anything else)."""
    content_type = request.headers.get("content-type", "")
    if "multipart/form-data" not in content_type:
        raise bad_request("send the audio as multipart/form-data with a 'file' field", code="invalid_content_type")
    try:
        form = await request.form(max_files=1, max_fields=50)
    except Exception as exc:  # malformed multipart bodies
        raise bad_request(f"the multipart body could not be read: {exc}", code="invalid_multipart") from None
    model = _field(form, "model")
    if not model:
        raise bad_request("'model' is required", param="model")
    served = get_state(request).registry.get(model)
    require_audio_model(served)
    return form, served


async def _read_request(request: Request) -> TranscriptionRequest:
    state = get_state(request)
    form, served = await _form_and_model(request)
    prompter = served.asr
    upload = form.get("file")
    if isinstance(upload, str):  # a part without a filename: multipart parsers read it as text
        raise bad_request("'file' came as a text field: send it as a file part with a filename "
                          "(curl -F file=@clip.wav)", param="file")
    if not isinstance(upload, UploadFile):
        raise bad_request("'file' is required: the audio file to transcribe", param="file")
    limit = state.config.max_audio_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise bad_request(f"file: the audio file is over the limit of {limit} bytes", param="file",
                          code="invalid_audio")
    response_format = _field(form, "response_format", "json") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got '{response_format}'",
                          param="response_format")
    stream = _flag(_field(form, "stream"), "stream")
    _check_granularities(form, response_format)
    if stream and response_format not in ("json", "text"):
        raise bad_request("stream=true gives text events; use response_format json or text", param="stream")
    try:
        temperature = float(_field(form, "temperature", "0") or 0)
    except ValueError:
        raise bad_request("temperature must be a number", param="temperature") from None
    if not 0.0 <= temperature <= 2.0:
        raise bad_request("temperature must be between 0 and 2", param="temperature")
    language = language_name(_field(form, "language"))
    context = _field(form, "prompt", "") or ""
    decoded = await decode_upload(data, state.config)
    try:
        segments = await asyncio.to_thread(segment_prompts, prompter, decoded.samples, context, language,
                                           SEGMENT_SECONDS)
    except RequestError as exc:  # the prompt text holds the audio placeholder token
        raise bad_request(f"prompt: {exc}", param="prompt") from None
    params = []
    for seg in segments:
        room = served.max_model_len - len(seg.prompt_ids)
        if room < 1:
            needs = "the audio and the prompt need" if context else "the audio needs"
            raise bad_request(f"{needs} {len(seg.prompt_ids)} prompt tokens, more than the model's context "
                              f"of {served.max_model_len}", param="prompt" if context else "file",
                              code="context_length_exceeded")
        params.append(SamplingParams(temperature=temperature, max_tokens=min(room, max_transcript_tokens(
            seg.end - seg.start))))
    return TranscriptionRequest(served, segments, decoded.seconds, language, response_format, stream, params)


async def _start(req: TranscriptionRequest, retry_after_s: int) -> list[OutputStream]:
    """Every segment submitted to the engine; each stream already past its first output (or refused)."""
    base = f"transcr-{uuid.uuid4().hex}"
    streams: list[OutputStream] = []
    try:
        for i, (seg, params) in enumerate(zip(req.segments, req.params)):
            gen = req.served.engine.generate(seg.prompt_ids, params, request_id=f"{base}-{i}",
                                             multimodal=MultimodalInputs(audios=[seg.clip]))
            streams.append(OutputStream(await first_output(gen, retry_after_s), gen))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams


def _usage(req: TranscriptionRequest, finals: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(s.prompt_ids) for s in req.segments)
    audio = sum(req.served.asr.model.audio_tokens(s.clip) for s in req.segments)
    output = sum(len(f.outputs[0].token_ids) for f in finals)
    return {"type": "tokens", "input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output,
            "input_token_details": {"audio_tokens": audio, "text_tokens": prompt - audio},
            "seconds": round(req.seconds, 3)}


async def _finish_all(streams: list[OutputStream]) -> list[RequestOutput]:
    finals = []
    for stream in streams:
        final = None
        async for out in stream:
            final = out
        assert final is not None
        finals.append(final)
    return finals


def _respond(req: TranscriptionRequest, finals: list[RequestOutput], task: str) -> Response:
    parsed = [req.served.asr.parse(f.outputs[0].text, req.language) for f in finals]
    text = " ".join(p.text for p in parsed if p.text)
    fmt = req.response_format
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    timed = [(s.start, s.end, p.text) for s, p in zip(req.segments, parsed)]
    if fmt == "srt":
        return PlainTextResponse(to_srt(timed), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(timed), media_type="text/vtt")
    usage = _usage(req, finals)
    if fmt == "json":
        return JSONResponse({"text": text, "usage": usage})
    detected = next((p.language for p in parsed if p.language), None)
    segments = [{"id": i, "seek": round(s.start * 100), "start": round(s.start, 3), "end": round(s.end, 3),
                 "text": p.text, "tokens": f.outputs[0].token_ids, "temperature": p_.temperature,
                 "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
                for i, (s, p, f, p_) in enumerate(zip(req.segments, parsed, finals, req.params))]
    return JSONResponse({"task": task, "language": (detected or "").lower(), "duration": round(req.seconds, 3),
                         "text": text, "segments": segments, "usage": usage,
                         "language_code": language_code(detected)})


async def _stream(req: TranscriptionRequest, streams: list[OutputStream], retry_after_s: int) -> AsyncIterator[str]:
    pieces: list[str] = []
    finals: list[RequestOutput] = []
    try:
        for stream in streams:
            parser = req.served.asr.transcript_text(req.language)
            segment: list[str] = []
            final = None
            async for out in stream:
                final = out
                comp = out.outputs[0]
                delta = parser.feed(comp.delta_text) if comp.delta_text else ""
                if comp.finished:
                    delta += parser.finish()
                if delta:
                    if pieces and not segment:
                        delta = " " + delta.lstrip()  # segments join with one space, as in the json text
                    segment.append(delta)
                    yield sse({"type": "transcript.text.delta", "delta": delta})
            assert final is not None
            finals.append(final)
            if "".join(segment).strip():
                pieces.append("".join(segment))
        yield sse({"type": "transcript.text.done", "text": "".join(pieces).strip(), "usage": _usage(req, finals)})
    except Exception as exc:
        yield error_frame(from_exception(exc, retry_after_s))


async def _handle(request: Request, task: str) -> Response:
    state = get_state(request)
    req = await _read_request(request)
    streams = await _start(req, state.config.retry_after_s)
    if req.stream:
        return ClosingStreamingResponse(_stream(req, streams, state.config.retry_after_s), sources=streams)
    try:
        finals = await _finish_all(streams)
    finally:
        for s in streams:
            await s.aclose()
    return _respond(req, finals, task)


TRANSCRIPTION_FORM = form_body({
    "file": "the audio file (WAV, FLAC, OGG, Opus, MP3, M4A, WebM, ...)", "model": "an audio model served here",
    "language": "the spoken language (name or ISO code); omitted: detected", "prompt": "context text",
    "temperature": "0 (greedy) to 2", "response_format": "json, text, verbose_json, srt or vtt",
    "stream": "true: transcript.text.delta events"}, required=("file", "model"))


@router.post("/v1/audio/transcriptions", openapi_extra=TRANSCRIPTION_FORM)
async def create_transcription(request: Request) -> Response:
    return await _handle(request, "transcribe")


@router.post("/v1/audio/translations", openapi_extra=TRANSCRIPTION_FORM)
async def create_translation(request: Request) -> Response:
    _, served = await _form_and_model(request)
    raise APIError(400, f"the model '{served.name}' transcribes speech but cannot translate it; use "
                        "/v1/audio/transcriptions (or a chat request asking for a translation of the transcript)",
                   param="model", code="unsupported_task")


__all__ = ["router"]
