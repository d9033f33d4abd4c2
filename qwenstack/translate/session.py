"""One live translation: audio chunks in; source transcript, translated text and translated speech out.

Three stages run as tasks of the session, each waiting on the one before it:
  ASR   LiveTranscription (the official re-feed with rollback) -> committed source text, append-only
  MT    IncrementalTranslation: complete units -> one greedy translation each, published whole
  TTS   each published unit -> a streaming SpeechRequest; its audio goes out as the talker makes it
so a unit is being spoken while the next is translated and later audio is being transcribed.

Decisions:
- Everything a session holds is its own: its audio buffer, its text state, its queues. Its requests
  in the shared engines are aborted when it ends however it ends (close, abort, failure), which frees
  their KV blocks; `resources()` says what it still holds, for the tests and for /api/ps-style reports.
- The client's pace cannot slow the engines: events wait in the session's queue; if more than
  `max_unsent_audio_seconds` of translated speech piles up unread, the session fails ("slow_client")
  instead of buffering without bound.
- Long sessions stay bounded: after `max_segment_seconds` of audio the ASR segment is finalised (one final
  decode, everything committed) and a new one starts, so the re-read audio never grows past it.
- `close()` flushes: a final decode over the segment's audio commits the rest of the transcript, the rest
  of the source becomes the last unit, and its speech is made before `Closed` is sent.
- A target-language or voice change applies to units completed after it; published text stays.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from qwenstack.audio.live import DecodeRequest, LiveTranscription
from qwenstack.translate.events import (Closed, Event, InputTranscript, OutputAudio, OutputTranscript,
                                        SessionFailed)
from qwenstack.translate.pipeline import TranslationPipeline
from qwenstack.translate.translator import IncrementalTranslation, target_code


@dataclass
class SessionSettings:
    language: str = "en"  # the target, an ISO-639-1 code
    voice: str | None = None  # None: the pipeline's first voice
    input_rate: int = 24000  # OpenAI's audio/pcm rate
    source_language: str | None = None  # Qwen's name ("English") to force it; None detects
    tentative: bool = True  # preview translations of the uncommitted source tail
    max_segment_seconds: float = 30.0
    max_unsent_audio_seconds: float = 60.0


@dataclass
class _SpeechJob:
    text: str
    language: str
    voice: str
    elapsed_ms: int
    ready_at: float  # monotonic time the audio whose decode completed this unit had arrived


class SessionError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TranslationSession:
    def __init__(self, pipeline: TranslationPipeline, settings: SessionSettings | None = None,
                 session_id: str | None = None) -> None:
        settings = settings or SessionSettings()
        self.pipeline = pipeline
        self.id = session_id or f"sess_{uuid.uuid4().hex[:20]}"
        self.language = self._language(settings.language)
        self.voice = pipeline.default_voice if settings.voice is None else self._voice(settings.voice)
        self.settings = settings
        live = pipeline.settings.live
        if settings.source_language is not None:
            live = type(live)(**{**live.__dict__, "language": settings.source_language})
        self.live = LiveTranscription(pipeline.prompter, live, settings.input_rate, pipeline.asr.max_model_len)
        self.translation = IncrementalTranslation(pipeline.settings.units, self.language)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.source = ""  # every committed source delta joined (all segments)
        self._sent = ""  # committed text of the current segment already handed on
        self._segment_offset = 0  # input samples in earlier segments
        self._unsent_audio = 0.0  # seconds of translated speech in `events`
        self._closing = False
        self._source_done = False
        self._audio_wake = asyncio.Event()
        self._source_wake = asyncio.Event()
        self._speech_jobs: asyncio.Queue[_SpeechJob | None] = asyncio.Queue()
        self._unit_ready_at = 0.0
        self._unit_elapsed = 0
        self._last_tentative = ""
        self.ended = False
        self._tasks: list[asyncio.Task[Any]] = []

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        for name, stage in (("asr", self._asr_stage), ("mt", self._mt_stage), ("tts", self._tts_stage)):
            self._tasks.append(asyncio.ensure_future(self._guard(name, stage)))

    async def _guard(self, name: str, stage: Callable[[], Awaitable[None]]) -> None:
        try:
            await stage()
        except asyncio.CancelledError:
            raise
        except SessionError as exc:
            self._fail(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - this session fails alone; the engines go on
            self._fail(f"{name}_failed", f"{type(exc).__name__}: {exc}")

    def _fail(self, code: str, message: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.events.put_nowait(SessionFailed(code, message))
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._release()

    async def close(self) -> None:
        """Flushes what is pending (the rest of the transcript, its translation and speech), then Closed."""
        if self.ended:
            return
        self._closing = True
        self._audio_wake.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.ended:
            self.ended = True
            self._release()
            self.events.put_nowait(Closed())

    async def abort(self) -> None:
        """Ends the session now (the client left or went quiet): in-flight requests are aborted."""
        self.ended = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._release()

    def _release(self) -> None:
        self.live.reset()  # the audio buffer

    def resources(self) -> dict[str, Any]:
        return {"audio_samples": self.live.samples, "tasks_running": sum(not t.done() for t in self._tasks),
                "queued_events": self.events.qsize()}

    # --- client input --------------------------------------------------------------------------------

    def append(self, samples: np.ndarray) -> None:
        if self.ended or self._closing:
            raise SessionError("session_closed", "the session is closing; no more audio is accepted")
        self.live.add(samples)
        self._audio_wake.set()

    def update(self, language: Any = None, voice: Any = None) -> None:
        """Validates both before changing either, so a bad update changes nothing."""
        new_language = self._language(language) if language is not None else self.language
        new_voice = self._voice(voice) if voice is not None else self.voice
        self.language, self.voice = new_language, new_voice
        self.translation.language = new_language

    def _language(self, language: Any) -> str:
        try:
            return target_code(language)
        except ValueError as exc:
            raise SessionError("invalid_value", str(exc)) from None

    def _voice(self, voice: Any) -> str:
        try:
            return self.pipeline.check_voice(voice)
        except ValueError as exc:
            raise SessionError("invalid_value", str(exc)) from None

    async def next_event(self) -> Event:
        event = await self.events.get()
        if isinstance(event, OutputAudio):
            self._unsent_audio -= len(event.samples) / event.sample_rate
        return event

    def _emit(self, event: Event) -> None:
        """Queues an event for the client; raises (ending the calling stage) once the session has ended or
        the client has fallen too far behind."""
        if self.ended:
            raise SessionError("session_closed", "the session has ended")
        if isinstance(event, OutputAudio):
            self._unsent_audio += len(event.samples) / event.sample_rate
            if self._unsent_audio > self.settings.max_unsent_audio_seconds:
                raise SessionError("slow_client", f"more than {self.settings.max_unsent_audio_seconds:g} s of "
                                                  "translated audio went unread; the session was closed")
        self.events.put_nowait(event)

    # --- ASR -----------------------------------------------------------------------------------------

    def _elapsed_ms(self) -> int:
        return int(1000 * (self._segment_offset + self.live.decoded_samples) / self.live.input_rate)

    async def _asr_stage(self) -> None:
        asr = self.pipeline.generate(self.pipeline.asr, "translate-asr")
        while True:
            await self._audio_wake.wait()
            self._audio_wake.clear()
            while self.live.due():
                request = self.live.next_request()
                if request is None:
                    break
                await self._decode(asr, request)
                if self.live.seconds >= self.settings.max_segment_seconds:
                    await self._finish_segment(asr)
            if self._closing:
                await self._finish_segment(asr)
                break
        self._source_done = True
        self._source_wake.set()

    async def _finish_segment(self, asr: Any) -> None:
        request = self.live.next_request(final=True)
        if request is not None:
            await self._decode(asr, request)
        self._segment_offset += self.live.samples
        self.live.reset()
        self._sent = ""

    async def _decode(self, asr: Any, request: DecodeRequest) -> None:
        arrived = time.monotonic()  # every sample this decode reads has arrived by now
        tokens = await asr(request.prompt_ids, request.params, request.multimodal)
        committed, tentative = self.live.accept(request, tokens)
        delta = committed[len(self._sent):] if committed.startswith(self._sent) else ""
        self._sent = committed
        if delta and not self._sent[:-len(delta)] and self.source and not self.source[-1].isspace():
            delta = " " + delta  # the first text of a new segment
        elapsed = self._elapsed_ms()
        if delta or not request.final:
            self._emit(InputTranscript(delta, tentative, elapsed))
        if delta:
            self.source += delta
            self.translation.add_source(delta)
            self._unit_ready_at, self._unit_elapsed = arrived, elapsed
            self._source_wake.set()

    # --- MT ------------------------------------------------------------------------------------------

    async def _mt_stage(self) -> None:
        pipeline = self.pipeline
        llm = pipeline.generate(pipeline.llm, "translate-mt")
        while True:
            await self._source_wake.wait()
            self._source_wake.clear()
            final = self._source_done
            ready_at, elapsed = self._unit_ready_at, self._unit_elapsed
            for unit in self.translation.ready(final):
                language, voice = self.language, self.voice
                text = await pipeline.translator.translate(llm, unit, language, self.translation.units,
                                                           pipeline.llm.max_model_len)
                delta = self.translation.commit(unit, text, language)
                self._emit(OutputTranscript(delta, "", elapsed, language))
                if text:
                    self._speech_jobs.put_nowait(_SpeechJob(text, language, voice, elapsed, ready_at))
            if final:
                self._speech_jobs.put_nowait(None)
                return
            tail = self.translation.tail()
            if self.settings.tentative and tail and tail != self._last_tentative and not self._source_wake.is_set():
                self._last_tentative = tail
                preview = await pipeline.translator.translate(llm, tail, self.language, self.translation.units,
                                                              pipeline.llm.max_model_len)
                self._emit(OutputTranscript("", preview, elapsed, self.language))

    # --- TTS -----------------------------------------------------------------------------------------

    async def _tts_stage(self) -> None:
        pipeline = self.pipeline
        rate = pipeline.tts.sample_rate
        while True:
            job = await self._speech_jobs.get()
            if job is None:
                return
            request = pipeline.speech_request(job.text, job.language, job.voice)
            first = True
            async for samples in pipeline.synthesize(request):
                lag = int(1000 * (time.monotonic() - job.ready_at)) if first else 0
                first = False
                self._emit(OutputAudio(samples, rate, job.elapsed_ms, lag))


__all__ = ["SessionError", "SessionSettings", "TranslationSession"]
