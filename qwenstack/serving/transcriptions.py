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
- `include[]=logprobs` (OpenAI's; `include` is read too) adds `logprobs: [{token, logprob, bytes}]` of the
  transcript's tokens (the language header and the end token are not transcript) to a json answer, and to
  each text event of a stream (the tokens of its delta; the done event has them all). OpenAI takes it with
  response_format json only; vLLM has no such field and ignores it; any other format is a 400 naming
  `include` here, as word timestamps are, rather than an answer silently without what was asked for.
- verbose_json segments score as whisper's do: avg_logprob is the mean logprob of the sampled tokens after
  the header, the end token included (whisper counts its EOT), and compression_ratio is the text's bytes over
  their zlib compression. The logprobs are the sampling pass's own (the engine's, of the model's
  distribution before temperature), never a second forward.
- usage counts tokens (OpenAI's `tokens` variant, audio and text input tokens apart) and adds `seconds`,
  the decoded duration.
- A transcript is bounded by max_transcript_tokens(segment seconds): a model that never stops cannot run to
  the context limit.
- Translation: no served model translates speech yet (Qwen3-ASR transcribes only), so the route answers a
  400 naming the model rather than silently transcribing.
"""
from __future__ import annotations

import asyncio
import statistics
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile

from qwenstack.audio.asr import (
    AsrOutput, SegmentPrompt, language_code, language_name, max_transcript_tokens,
    segment_prompts,
)
from qwenstack.audio.subtitles import to_srt, to_vtt
from qwenstack.engine.outputs import CompletionOutput, RequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.multimodal.inputs import MultimodalInputs
from qwenstack.serving.audio import decode_upload, require_audio_model
from qwenstack.serving.errors import APIError, bad_request, error_frame, from_exception
from qwenstack.serving.logprobs import TokenTexts, token_logprobs
from qwenstack.serving.openapi import form_body
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import get_state
from qwenstack.serving.streaming import ClosingStreamingResponse, OutputStream, first_output, sse

router = APIRouter()

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
INCLUDES = ("logprobs",)
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
    logprobs: bool = False  # include[] logprobs


def _field(form: Any, name: str, default: str | None = None) -> str | None:
    value = form.get(name)
    if value is None:
        return default
    if isinstance(value, UploadFile):
        raise bad_request(f"'{name}' must be a form field, not a file", param=name)
    return str(value)


def _list_field(form: Any, name: str) -> list[str]:
    """A list form field's values: the openai SDK sends `name[]` once a value, other clients `name`."""
    values = [v for key in (f"{name}[]", name) for v in form.getlist(key)]
    if any(isinstance(v, UploadFile) for v in values):
        raise bad_request(f"'{name}' must be a form field, not a file", param=name)
    return [str(v) for v in values]


def _check_granularities(form: Any, response_format: str) -> None:
    """OpenAI's timestamp_granularities (the SDK sends `timestamp_granularities[]`): segment times are what
    verbose_json gives; word times Qwen3-ASR does not produce, so asking for them is a 400, not a silent omission."""
    asked = _list_field(form, "timestamp_granularities")
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


def _wants_logprobs(form: Any, response_format: str) -> bool:
    """OpenAI's include: ['logprobs'] is the one value; only json has a place for them (module notes)."""
    asked = _list_field(form, "include")
    unknown = [v for v in asked if v not in INCLUDES]
    if unknown:
        raise bad_request(f"include takes {', '.join(repr(i) for i in INCLUDES)}, got '{unknown[0]}'", param="include")
    if asked and response_format != "json":
        raise bad_request(f"include ['logprobs'] needs response_format json (got '{response_format}'); "
                          "verbose_json segments carry avg_logprob", param="include")
    return bool(asked)


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
    logprobs = _wants_logprobs(form, response_format)
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
        # The chosen tokens' logprobs (0 alternatives) come with the sampling: include[] and verbose_json's scores.
        params.append(SamplingParams(temperature=temperature, max_tokens=min(room, max_transcript_tokens(
            seg.end - seg.start)), logprobs=0 if logprobs or response_format == "verbose_json" else None))
    return TranscriptionRequest(served, segments, decoded.seconds, language, response_format, stream, params,
                                logprobs)


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


def _transcript_end(comp: CompletionOutput) -> int:
    """The end of an answer's transcript tokens: the eos token that stopped it (a stop with no stop_reason) is
    not text."""
    return len(comp.token_ids) - int(comp.finish_reason == "stop" and comp.stop_reason is None)


def _logprobs_between(texts: TokenTexts, comp: CompletionOutput, start: int, end: int) -> list[dict]:
    return token_logprobs(texts, comp.token_ids[start:end], (comp.logprobs or [])[start:end])


def _transcript_logprobs(req: TranscriptionRequest, texts: TokenTexts, finals: list[RequestOutput]) -> list[dict]:
    """include[] logprobs: every segment's transcript tokens, in order."""
    out: list[dict] = []
    for final in finals:
        comp = final.outputs[0]
        out += _logprobs_between(texts, comp, req.served.asr.transcript_start(comp.token_ids, req.language),
                                 _transcript_end(comp))
    return out


def _compression_ratio(text: str) -> float:
    """whisper's: the UTF-8 bytes over their zlib-compressed length (above 2.4 whisper calls a segment repetitive)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw))


def _segment(req: TranscriptionRequest, i: int, parsed: AsrOutput, final: RequestOutput) -> dict[str, Any]:
    """One verbose_json segment. `tokens` are the transcript's (the language header and the end token are not
    text content); avg_logprob averages the sampled tokens after the header, the end token with them (module
    notes)."""
    seg, comp = req.segments[i], final.outputs[0]
    start = req.served.asr.transcript_start(comp.token_ids, req.language)
    scored = [entry[token].logprob for token, entry in zip(comp.token_ids[start:], (comp.logprobs or [])[start:])]
    return {"id": i, "seek": round(seg.start * 100), "start": round(seg.start, 3), "end": round(seg.end, 3),
            "text": parsed.text, "tokens": comp.token_ids[start:_transcript_end(comp)],
            "temperature": req.params[i].temperature,
            "avg_logprob": statistics.fmean(scored) if scored else 0.0,
            "compression_ratio": _compression_ratio(parsed.text),
            # whisper's no_speech_prob is P(<|nospeech|>) where the transcript starts; Qwen3-ASR has no such token
            # (it writes `language None` when it hears no speech, a sampled choice whose probability the top-k
            # logprobs do not give when another was chosen, and absent when the caller names the language).
            "no_speech_prob": 0.0}


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
        body: dict[str, Any] = {"text": text, "usage": usage}
        if req.logprobs:
            body["logprobs"] = _transcript_logprobs(req, TokenTexts(req.served.tokenizer), finals)
        return JSONResponse(body)
    detected = next((p.language for p in parsed if p.language), None)
    segments = [_segment(req, i, p, f) for i, (p, f) in enumerate(zip(parsed, finals))]
    return JSONResponse({"task": task, "language": (detected or "").lower(), "duration": round(req.seconds, 3),
                         "text": text, "segments": segments, "usage": usage,
                         "language_code": language_code(detected)})


@dataclass
class _StreamedLogprobs:
    """The transcript tokens of one streamed answer whose logprobs have not gone out yet."""

    req: TranscriptionRequest
    texts: TokenTexts
    start: int | None = None  # where the transcript begins, once text has shown (the header is settled then)
    sent: int = 0

    def take(self, comp: CompletionOutput) -> list[dict]:
        """The logprobs of the tokens since the last take: a delta's text is theirs (held-back tokens, such as
        leading spaces, go with the next delta)."""
        if self.start is None:
            self.start = self.req.served.asr.transcript_start(comp.token_ids, self.req.language)
        begin, end = max(self.start, self.sent), _transcript_end(comp)
        self.sent = max(self.sent, end)
        return _logprobs_between(self.texts, comp, begin, end)


async def _stream(req: TranscriptionRequest, streams: list[OutputStream], retry_after_s: int) -> AsyncIterator[str]:
    pieces: list[str] = []
    finals: list[RequestOutput] = []
    texts = TokenTexts(req.served.tokenizer) if req.logprobs else None
    try:
        for stream in streams:
            parser = req.served.asr.transcript_text(req.language)
            logprobs = _StreamedLogprobs(req, texts) if texts is not None else None
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
                    event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta}
                    if logprobs is not None:
                        event["logprobs"] = logprobs.take(comp)
                    yield sse(event)
            assert final is not None
            finals.append(final)
            if "".join(segment).strip():
                pieces.append("".join(segment))
        done: dict[str, Any] = {"type": "transcript.text.done", "text": "".join(pieces).strip()}
        if texts is not None:
            done["logprobs"] = _transcript_logprobs(req, texts, finals)
        yield sse({**done, "usage": _usage(req, finals)})
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
    "stream": "true: transcript.text.delta events",
    "include[]": "logprobs: the transcript tokens' logprobs (response_format json)"}, required=("file", "model"))


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
