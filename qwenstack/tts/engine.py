"""Batched, streaming speech generation for Qwen3-TTS: the talker with paged KV and continuous batching,
the code predictor as a per-step sub-decoder, and the codec decoding each request's frames as they come.

Decisions:
- This is a speech-specific step loop beside the text LLMEngine, not the LLMEngine itself: the talker's
  inputs are embeddings (text + codec rows), each step needs the code predictor between the sampled first
  code and the next talker input, and outputs are audio. It reuses the engine's parts: BlockManager for the
  paged KV pool, the paged attention of models/attention.py, and the sampler (penalties, top-k/top-p,
  per-request seeded generators).
- Every step is one talker forward over a packed batch: the prefill rows of newly admitted requests and
  one decode row per running request (continuous batching: requests join and leave between steps). The
  code predictor runs once per step for all running requests together.
- Admission reserves KV blocks for the prompt plus max_frames, so a running request never needs
  preemption; requests wait in FIFO order while the pool is short.
- Sampling follows qwen-tts: the first code with repetition penalty over the codes so far, the top 1024
  talker ids suppressed except EOS, EOS blocked for the first 2 codes; codes 1..G-1 sampled without
  penalty. temperature 0 is greedy.
- Audio: each request owns a CodecStream (exact incremental decode); its first chunk leaves after
  first_chunk_frames (a fast first packet), the later ones end on multiples of chunk_frames, so with the
  default 4 each chunk is one whole block of the codec's grid and is decoded once.
- One owner thread steps the loop (`SpeechService`); callers submit and read their request's queue.
- The same loop runs Qwen3-Omni's Talker (audio/omni_speech.py), whose text arrives while it speaks: a
  prompt's `step_text(step)` may be None (the Thinker has not written that token yet), and then the request
  sits out the step, keeping its KV, until `update` gives it more text. Positions come from the prompt
  (`positions(start, n)`: plain for Qwen3-TTS, M-RoPE rows for the Omni Talker), and a request's max_frames may
  be lowered while it runs (the Omni speech limits, known once its text is complete).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from qwenstack.engine.block_manager import BlockManager
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.sampler import SampleRequest, sample_row
from qwenstack.errors import RequestError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.fast_paths import prepare_for_cpu

log = logging.getLogger("qwenstack.tts")


@dataclass
class SpeechParams:
    """Sampling of a speech request (qwen-tts defaults); temperature 0 is greedy."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    seed: int | None = None
    max_frames: int = 2047  # qwen-tts: max_new_tokens 2048, the last sampled code is never decoded
    first_chunk_frames: int = 1
    chunk_frames: int = 4
    eos_blocked_frames: int = 2  # qwen-tts never lets the talker stop before its 2nd frame; Omni's Talker may

    def talker_sampling(self, suppress: list[int]) -> SamplingParams:
        def mask(_: list[int], logits: torch.Tensor) -> torch.Tensor:
            logits[suppress] = float("-inf")
            return logits

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, max_tokens=None, logits_processors=[mask])

    def subtalker_sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.subtalker_temperature, top_k=self.subtalker_top_k,
                              top_p=self.subtalker_top_p, max_tokens=None)


@dataclass
class AudioChunk:
    request_id: str
    samples: torch.Tensor  # float32 [n] at the codec's sample rate; empty on the final chunk
    frames: torch.Tensor  # the codec frames [k, G] this chunk decodes
    finished: bool = False
    finish_reason: str | None = None  # "stop" (codec EOS) or "length"


class TalkerInput(Protocol):
    """What the loop reads of a request's prompt (models/qwen3_tts.py SpeechPrompt, Omni's SpokenAnswer)."""

    prefill: torch.Tensor  # [L, H] talker input rows of the prompt

    def positions(self, start: int, n: int) -> torch.Tensor:
        """Rotary positions [n] (or [3, n] for M-RoPE) of talker rows start .. start + n - 1."""

    def step_text(self, step: int) -> torch.Tensor | None:
        """The text row [H] added to frame `step`'s input, None while it is not known yet."""


@dataclass
class SpeechRequest:
    request_id: str
    prompt: TalkerInput
    params: SpeechParams
    context_codes: torch.Tensor | None = None  # reference codes decoded first and not emitted (ICL clone)
    # --- engine state
    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # talker positions holding KV
    codes0: list[int] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)  # frames not yet decoded to audio
    emitted_frames: int = 0
    past_hidden: torch.Tensor | None = None
    generator: torch.Generator | None = None
    stream: Any = None  # the codec's stream (CodecStream, or Code2WavStream for Qwen3-Omni)
    finish_reason: str | None = None
    report_idle: bool = False  # SpeechService: tell the caller when this request waits for more text


class SpeechEngine:
    """Steps every admitted request by one frame per call of `step()`; not thread-safe (one owner)."""

    def __init__(self, model: Any, codec: Any, kv_blocks: int = 256, block_size: int = 16, max_batch: int = 16,
                 seed: int = 0) -> None:
        """model: anything with a `talker` (Qwen3TTSForConditionalGeneration, Qwen3OmniMoeForConditionalGeneration);
        codec: its decoder, with `stream()` (CodecDecoder, Code2Wav)."""
        self.model, self.codec = model, codec
        self.talker = model.talker
        # The native norms and attention on CPU; the linears stay F.linear (the speech loop's codes are
        # checked token for token against the reference's sums).
        for module in (model, codec):
            if isinstance(module, nn.Module):
                prepare_for_cpu(module, linears=False)
        param = next(self.talker.parameters())
        self.device, self.dtype = param.device, param.dtype
        spec = self.talker.kv_cache_spec()
        self.blocks = BlockManager(kv_blocks, block_size, enable_prefix_caching=False)
        shape = (2, kv_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(spec.num_layers)]
        self.block_size, self.max_batch = block_size, max_batch
        self.waiting: list[SpeechRequest] = []
        self.running: list[SpeechRequest] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.suppress = self.talker.suppressed_codes()
        self.eos = self.talker.args.codec_eos_token_id
        self.largest_batch = 0  # the most requests one step has decoded together (tests and benchmarks)

    def check(self, request: SpeechRequest) -> None:
        """Raises RequestError if the request could never fit the KV pool (safe from any thread)."""
        need = self.blocks.blocks_needed(request.prompt.prefill.shape[0] + request.params.max_frames + 1)
        if need > self.blocks.num_blocks:
            raise RequestError(f"the request needs {need} KV blocks of {self.block_size} positions (prompt "
                               f"{request.prompt.prefill.shape[0]} + {request.params.max_frames} frames); the pool "
                               f"has {self.blocks.num_blocks}: shorten the input or lower max_new_tokens")

    def add(self, request: SpeechRequest) -> None:
        self.check(request)
        if request.params.seed is not None:
            request.generator = torch.Generator().manual_seed(request.params.seed)
        request.stream = self.codec.stream()
        if request.context_codes is not None and request.context_codes.numel():
            request.stream.push(request.context_codes)  # reference audio of an ICL clone: context only
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        for queue_ in (self.waiting, self.running):
            for r in list(queue_):
                if r.request_id == request_id:
                    queue_.remove(r)
                    self.blocks.release(r.block_table)

    def has_work(self) -> bool:
        """Whether step() would do anything: a request to admit, or a running one with its next text known."""
        return bool(self.waiting) or any(self._ready(r) for r in self.running)

    def find(self, request_id: str) -> SpeechRequest | None:
        return next((r for r in self.waiting + self.running if r.request_id == request_id), None)

    @staticmethod
    def _ready(r: SpeechRequest) -> bool:
        return len(r.frames) >= r.params.max_frames or r.prompt.step_text(len(r.frames)) is not None

    def _admit(self) -> list[SpeechRequest]:
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            r = self.waiting[0]
            tokens = r.prompt.prefill.shape[0] + r.params.max_frames + 1
            if not self.blocks.can_grow(r.block_table, tokens):
                break
            self.blocks.grow(r.block_table, tokens)
            admitted.append(self.waiting.pop(0))
        return admitted

    def _choose(self, logits: torch.Tensor, requests: list[SpeechRequest], talker: bool) -> list[int]:
        out = []
        for row, r in zip(logits, requests):
            if talker:
                params = r.params.talker_sampling(self.suppress)
                block = [self.eos] if len(r.codes0) < r.params.eos_blocked_frames else []
                req = SampleRequest(params, [], r.codes0, r.generator, block)
            else:
                req = SampleRequest(r.params.subtalker_sampling(), [], [], r.generator, [])
            out.append(sample_row(row.float().clone(), req, self.generator))
        return out

    @torch.inference_mode()
    def step(self) -> list[AudioChunk]:
        """One talker forward for all running requests whose next text is known and the newly admitted ones;
        returns the audio it completed."""
        chunks: list[AudioChunk] = []
        decoding, texts = [], []
        for r in self.running:
            if len(r.frames) >= r.params.max_frames:  # a limit lowered while it ran: the pending code is dropped
                r.finish_reason = "length"
                chunks.extend(self._audio(r))
                self.blocks.release(r.block_table)
            elif (text := r.prompt.step_text(len(r.frames))) is not None:
                decoding.append(r)
                texts.append(text)
        self.running = [r for r in self.running if r.finish_reason is None]
        admitted = self._admit()
        if not decoding and not admitted:
            return chunks
        self.largest_batch = max(self.largest_batch, len(decoding))
        talker = self.talker
        rows, positions, slots, query_lens, context_lens = [], [], [], [], []
        if decoding:
            past = torch.stack([r.past_hidden for r in decoding])  # type: ignore[misc]
            code0 = torch.tensor([r.codes0[-1] for r in decoding], device=self.device)
            rest = talker.code_predictor.predict(past, talker.model.codec_embedding(code0),
                                                 lambda g, logits: self._choose(logits, decoding, talker=False))
            frames = torch.cat([code0[:, None], rest], dim=1)
            embeds = talker.frame_embeds(frames)
            for i, r in enumerate(decoding):
                r.frames.append(frames[i].cpu())
                r.pending.append(frames[i].cpu())
                rows.append((embeds[i] + texts[i])[None])
        for r in decoding + admitted:
            n = 1 if r in decoding else r.prompt.prefill.shape[0]
            if r in admitted:
                rows.append(r.prompt.prefill.to(self.dtype))
            start = r.num_tokens
            positions.append(r.prompt.positions(start, n))
            slots.extend(r.block_table[p // self.block_size] * self.block_size + p % self.block_size
                         for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            r.num_tokens += n
        batch_reqs = decoding + admitted
        width = max(len(r.block_table) for r in batch_reqs)
        tables = torch.tensor([r.block_table + [0] * (width - len(r.block_table)) for r in batch_reqs],
                              device=self.device)
        batch = AttentionBatch(query_lens, context_lens, slot_mapping=torch.tensor(slots, device=self.device),
                               block_tables=tables, block_size=self.block_size)
        hidden = talker(torch.cat(rows).to(self.dtype), torch.cat(positions, dim=-1).to(self.device), batch,
                        self.kv_caches)
        last = hidden[batch.last_token_indices(self.device)]
        chosen = self._choose(talker.compute_logits(last), batch_reqs, talker=True)
        for r, h, code in zip(batch_reqs, last, chosen):
            r.past_hidden = h
            r.codes0.append(code)
            if code == self.eos:
                r.finish_reason = "stop"
            elif len(r.frames) >= r.params.max_frames:
                r.finish_reason = "length"
            chunks.extend(self._audio(r))
        # Requests waiting for text stay; the order of `running` is the order they were admitted.
        self.running = [r for r in self.running + admitted if r.finish_reason is None]
        for r in batch_reqs:
            if r.finish_reason is not None:
                self.blocks.release(r.block_table)
        return chunks

    def _audio(self, r: SpeechRequest) -> list[AudioChunk]:
        assert r.stream is not None
        if r.emitted_frames == 0:
            want = r.params.first_chunk_frames
        else:  # later chunks end on multiples of chunk_frames (of the codec's frame count: its block grid)
            want = r.params.chunk_frames - r.stream.frames % r.params.chunk_frames
        out = []
        if r.pending and (len(r.pending) >= want or r.finish_reason is not None):
            frames = torch.stack(r.pending)
            out.append(AudioChunk(r.request_id, r.stream.push(frames), frames))
            r.emitted_frames += len(r.pending)
            r.pending = []
        if r.finish_reason is not None:
            out.append(AudioChunk(r.request_id, torch.zeros(0), torch.zeros(0, 0, dtype=torch.long), True,
                                  r.finish_reason))
        return out

    def generate(self, requests: list[SpeechRequest]) -> dict[str, list[AudioChunk]]:
        """Runs requests to completion (offline use and tests): request id -> its chunks in order."""
        out: dict[str, list[AudioChunk]] = {r.request_id: [] for r in requests}
        for r in requests:
            self.add(r)
        while self.has_work():
            for chunk in self.step():
                out[chunk.request_id].append(chunk)
        return out


_END = object()
_IDLE = object()


class SpeechService:
    """A SpeechEngine stepped by one background thread; `submit` returns an iterator of the request's chunks."""

    def __init__(self, engine: SpeechEngine, name: str = "tts") -> None:
        self.engine = engine
        self._commands: queue.Queue[Any] = queue.Queue()
        self._sinks: dict[str, queue.Queue[Any]] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name=f"qwenstack-{name}", daemon=True)
        self._thread.start()

    def new_request_id(self) -> str:
        return f"speech-{next(self._ids)}"

    def submit(self, request: SpeechRequest) -> "queue.Queue[Any]":
        sink: queue.Queue[Any] = queue.Queue()
        self._commands.put(("add", request, sink))
        return sink

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def update(self, request_id: str, change: Callable[[SpeechRequest], None]) -> None:
        """Runs change(request) on the loop's thread (more text for its prompt, a lower max_frames); the
        request's sink then gets an idle mark once the request has gone as far as its text allows."""
        self._commands.put(("update", request_id, change))

    @staticmethod
    def chunks(sink: "queue.Queue[Any]") -> Iterator[AudioChunk]:
        yield from SpeechService.until_idle(sink, stop_when_idle=False)

    @staticmethod
    def until_idle(sink: "queue.Queue[Any]", stop_when_idle: bool = True) -> Iterator[AudioChunk]:
        """The request's chunks until it waits for more text (a request submitted with report_idle) or ends."""
        while True:
            item = sink.get()
            if item is _END:
                return
            if item is _IDLE:
                if stop_when_idle:
                    return
                continue
            if isinstance(item, BaseException):
                raise item
            yield item

    def _report_idle(self) -> None:
        for r in self.engine.running:
            if r.report_idle and not self.engine._ready(r) and (sink := self._sinks.get(r.request_id)) is not None:
                r.report_idle = False
                sink.put(_IDLE)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_work()
            try:
                while True:
                    kind, payload, extra = self._commands.get(block=block)
                    block = False
                    if kind == "add":
                        sink = extra
                        try:
                            engine.add(payload)
                            self._sinks[payload.request_id] = sink
                        except Exception as exc:  # noqa: BLE001 - the request fails alone
                            sink.put(exc)
                            sink.put(_END)
                    elif kind == "update":
                        if (r := engine.find(payload)) is not None:
                            try:
                                extra(r)
                                r.report_idle = True
                            except Exception as exc:  # noqa: BLE001 - the request fails alone
                                self._fail(r.request_id, exc)
                    else:
                        engine.abort(payload)
                        gone = self._sinks.pop(payload, None)
                        if gone is not None:
                            gone.put(_END)
            except queue.Empty:
                pass
            self._report_idle()
            try:
                chunks = engine.step()
            except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
                log.exception("speech step failed")
                for r in engine.running + engine.waiting:
                    self._fail(r.request_id, RequestError(f"speech generation failed: {exc}"))
                continue
            for chunk in chunks:
                sink = self._sinks.get(chunk.request_id)
                if sink is None:
                    continue
                sink.put(chunk)
                if chunk.finished:
                    sink.put(_END)
                    self._sinks.pop(chunk.request_id, None)
            self._report_idle()

    def _fail(self, request_id: str, exc: Exception) -> None:
        self.engine.abort(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink.put(exc)
            sink.put(_END)


class InlineSpeechStage:
    """SpeechService's interface stepped in the caller's own thread: one caller, no background thread (offline
    use and tests). A sink is the request id."""

    def __init__(self, engine: SpeechEngine) -> None:
        self.engine = engine

    def submit(self, request: SpeechRequest) -> str:
        self.engine.add(request)
        return request.request_id

    def update(self, request_id: str, change: Callable[[SpeechRequest], None]) -> None:
        if (r := self.engine.find(request_id)) is not None:
            change(r)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def until_idle(self, sink: str) -> Iterator[AudioChunk]:
        while self.engine.has_work():
            yield from (c for c in self.engine.step() if c.request_id == sink)
