"""Speech for a Qwen3-Omni answer while it is being written: Thinker tokens in, 24 kHz audio chunks out.

Decisions:
- The Thinker runs in the engine as for any chat; this object follows its tokens. The Talker's prompt needs
  the answer's first token, and its step j needs answer token j + 1 or the knowledge that the answer ended
  (then tts_eos, and tts_pad after it), exactly as transformers builds `trailing_text_hidden`; so the Talker
  trails the text by about two tokens and the first audio comes long before the text ends.
- Multimodal user turns need the Thinker's hidden states of layer accept_hidden_layer at those positions:
  one uncached pass over the prompt up to that layer (`thinker_states`), run once when the session starts.
  Text-only prompts skip it: the Talker reads only input embeddings at text positions.
- The image/audio encoders are not run again: the server passes the runner's EncoderCache, which the
  engine's prefill filled before the Talker starts (after the answer's second token). The pass through the
  first accept_hidden_layer Thinker layers (24 of 48 in the released model) does repeat the prefill's work.
  It is not taken from the engine because the engine does not always compute it and never keeps it:
  prefix caching skips the cached blocks of a prompt (a repeated image or system turn), chunked prefill
  spreads one prompt over steps mixed with other requests, tensor parallelism keeps activations on the
  worker ranks, and the decoder returns only its last layer. Taking it needs a per-step "keep rows R of
  layer k" argument through runner, model and RequestOutput, and spoken requests exempt from prefix hits.
- How long it speaks: transformers and vLLM-Omni stop the Talker only at its codec EOS or after 4096 frames
  (~5.5 min). A reply should not outlast its text by much, so `SpeechLimits` (optional) also ends it after
  `frames_per_token` frames per spoken token plus `tail_frames` once the text is complete: the Talker
  reads one token per frame while the text lasts, then keeps speaking from tts_pad rows, and natural speech
  needs ~4 frames (0.3 s) per token. A cut answer's `finish_reason` is "length".
- Frames go to Code2Wav's exact stream in chunks (`first_chunk_frames` for a fast first packet, then
  `chunk_frames`); the samples streamed equal the one-shot decode of all frames.
- The Talker runs in a speech stage shared by every spoken answer of a model: Qwen3-TTS's batched loop
  (tts/engine.py SpeechService, one thread; the server makes one per Omni model), so several conversations'
  Talker steps go in one batched forward, with paged KV freed when an answer ends or is closed. `feed` hands
  the stage the new tokens and waits until this answer's Talker has gone as far as its text allows (the audio
  it made rides along with the text delta that caused it); other answers' steps share those forwards. With no
  stage given, a private one is stepped in the caller's thread (InlineSpeechStage).
- Not thread-safe: one caller feeds it (the server runs it in a worker thread, off the event loop).
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from qwenstack.models.qwen3_omni_moe_talker import (
    SpokenAnswer, TalkerSampling, build_talker_prompt, speech_params, talker_text_rows,
)
from qwenstack.tts.engine import InlineSpeechStage, SpeechEngine, SpeechRequest, SpeechService
from qwenstack.multimodal.inputs import (
    AudioPlacement, EncodedImage, EncoderCache, MultimodalBatch, MultimodalPlan, first_encoder_row, placed_input,
)


@dataclass
class SpeechChunking:
    first_chunk_frames: int = 1
    chunk_frames: int = 4


@dataclass(frozen=True)
class SpeechLimits:
    """How many frames (80 ms each) one answer may be spoken for, once its text is complete."""

    frames_per_token: float = 8.0  # 0.64 s a token: twice slow speech, so a real Talker ends first by EOS
    tail_frames: int = 25  # 2 s on top, for a short answer's closing silence

    def __post_init__(self) -> None:
        # Below one frame a token the Talker, which reads one token a frame, could already be past the limit.
        if self.frames_per_token < 1 or self.tail_frames < 0:
            raise ValueError("SpeechLimits needs frames_per_token >= 1 and tail_frames >= 0")

    def frames(self, spoken_tokens: int) -> int:
        return math.ceil(spoken_tokens * self.frames_per_token) + self.tail_frames


def prompt_states(model: Any, prompt_ids: Sequence[int], plan: MultimodalPlan | None,
                  encoder_cache: EncoderCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's Thinker input embeddings and the hidden states the Talker reads (layer accept_hidden_layer).
    encoder_cache: the engine runner's; its outputs for this prompt's images and clips are reused (the engine's
    prefill put them there before the Talker starts), and only what was evicted is encoded again."""
    weight = model.thinker.model.embed_tokens.weight
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=weight.device)
    layer = model.args.talker.accept_hidden_layer
    if plan is None or not plan.placements:
        # No multimodal rows: the Talker reads no hidden state, so layer 0 (the embeddings) is enough.
        return model.thinker_states(ids, torch.arange(len(ids), device=weight.device), None, 0)
    cached: dict[str, EncodedImage] = {}
    if encoder_cache is not None:
        for p in plan.placements:
            key = placed_input(p).content_hash
            if (hit := encoder_cache.get(key)) is not None:
                cached[key] = hit
    # by hash: the pieces of a video's audio track share one clip, encoded once
    missing = {placed_input(p).content_hash: p for p in plan.placements if placed_input(p).content_hash not in cached}
    images = {k: p.image for k, p in missing.items() if not isinstance(p, AudioPlacement)}
    audios = {k: p.audio for k, p in missing.items() if isinstance(p, AudioPlacement)}
    for batch, encode in ((images, model.encode_images), (audios, model.encode_audio)):
        if batch:
            cached.update(zip(batch, encode(list(batch.values()))))
    rows, embeds, deepstack = [], [], []
    for p in plan.placements:
        out = cached[placed_input(p).content_hash]
        rows.append(torch.arange(p.offset, p.end))
        first = first_encoder_row(p)  # a piece of a video's audio track takes its own rows of the clip
        embeds.append(out.embeds[first:first + p.length])
        deepstack.append(out.deepstack[:, first:first + p.length])
    batch = MultimodalBatch(torch.cat(rows).to(weight.device), torch.cat(embeds), torch.cat(deepstack, dim=1))
    return model.thinker_states(ids, plan.positions.to(weight.device), batch, layer)


def answer_request(model: Any, request_id: str, prompt_ids: Sequence[int], plan: MultimodalPlan | None, voice: str,
                   tokens: Sequence[int], eos: Sequence[int], sampling: TalkerSampling, chunking: SpeechChunking,
                   text_done: bool = False, encoder_cache: EncoderCache | None = None) -> SpeechRequest:
    """The speech loop's request for one answer whose first two tokens (of `tokens`: the prompt's after its
    assistant head, then the answer's) are known. Blocking: runs the Talker prompt's Thinker pass."""
    with torch.inference_mode():
        embeds, hidden = prompt_states(model, prompt_ids, plan, encoder_cache)
        placements = plan.placements if plan is not None else ()
        prompt = build_talker_prompt(model, prompt_ids, tokens[0], voice, embeds, hidden, placements)
    answer = SpokenAnswer(prompt, tokens, eos, lambda ids: talker_text_rows(model, ids))
    if text_done:
        answer.end_text()
    return SpeechRequest(request_id, answer, speech_params(sampling, chunking.first_chunk_frames, chunking.chunk_frames))


class AnswerSpeech:
    """Feed it the answer's tokens as they come (`feed`), then `finish`; both return new audio samples.
    `close` withdraws it from the stage (a cancelled request) and frees its Talker KV."""

    def __init__(self, model: Any, prompt_ids: Sequence[int], plan: MultimodalPlan | None, voice: str,
                 eos_token_ids: Sequence[int], sampling: TalkerSampling | None = None,
                 chunking: SpeechChunking | None = None, limits: SpeechLimits | None = None,
                 encoder_cache: EncoderCache | None = None, stage: Any = None) -> None:
        """limits None: the Talker stops at its EOS or sampling.max_frames only, as in transformers.
        encoder_cache: the engine's, so images and clips the prefill encoded are not encoded again.
        stage: a SpeechService over this model's Talker, shared with other answers; None: a private one."""
        if not getattr(model, "has_talker", False):
            raise ValueError("this model has no Talker (enable_audio_output is false)")
        self.model, self.prompt_ids, self.plan, self.voice = model, list(prompt_ids), plan, voice
        self.eos = list(eos_token_ids)
        self.sampling = sampling or TalkerSampling()
        self.chunking = chunking or SpeechChunking()
        self.limits = limits
        self.encoder_cache = encoder_cache
        self.stage = stage
        # Everything after the last assistant head is spoken: prompt tokens there (an empty think block a
        # template adds) come first, as transformers' assistant part starts at that head.
        args = model.args
        ids = self.prompt_ids
        heads = [i for i in range(len(ids) - 1) if ids[i] == args.im_start_token_id and ids[i + 1] == args.assistant_token_id]
        self.tokens: list[int] = list(ids[heads[-1] + 3:]) if heads else []
        self.thinker_done = False
        self.request_id = f"omni-speech-{uuid.uuid4().hex}"
        self.sink: Any = None  # the stage's handle of our request, once submitted
        self.frames: list[torch.Tensor] = []
        self.finish_reason: str | None = None  # "stop" (the Talker's EOS), "length" (a limit), None while it speaks
        self.ended = False

    def _start(self) -> bool:
        """Submits the Talker prompt once the answer's second token is known; False while it cannot start."""
        if self.sink is not None:
            return True
        # The prompt needs the second token, which tells whether the first is also the last; an answer of a
        # single token (max_tokens 1) is therefore not spoken.
        if len(self.tokens) < 2:
            return False
        request = answer_request(self.model, self.request_id, self.prompt_ids, self.plan, self.voice, self.tokens,
                                 self.eos, self.sampling, self.chunking, self.thinker_done, self.encoder_cache)
        request.params.max_frames = self._frame_limit()
        request.report_idle = True
        if self.stage is None:
            blocks = -(-(request.prompt.prefill.shape[0] + request.params.max_frames + 1) // PRIVATE_BLOCK)
            self.stage = InlineSpeechStage(SpeechEngine(self.model, self.model.code2wav, kv_blocks=blocks,
                                                        block_size=PRIVATE_BLOCK, max_batch=1))
        self.sink = self.stage.submit(request)
        return True

    def _frame_limit(self) -> int:
        """Frames this answer may reach: unbounded by the text until the text is complete."""
        if self.limits is None or not self.thinker_done:
            return self.sampling.max_frames
        spoken = sum(t not in self.eos for t in self.tokens)
        return min(self.sampling.max_frames, self.limits.frames(spoken))

    def _chunks(self, change: Any) -> Iterator[torch.Tensor]:
        """Applies `change` to our request on the stage's thread, then yields the samples of each chunk the
        Talker makes until it waits for more text or ends."""
        if self.ended:
            return
        fresh = self.sink is None
        if not self._start():
            return
        if not fresh:
            self.stage.update(self.request_id, change)
        for chunk in self.stage.until_idle(self.sink):
            if chunk.frames.numel():
                self.frames.extend(chunk.frames.unbind(0))
            if chunk.finished:
                self.ended, self.finish_reason = True, chunk.finish_reason
            if chunk.samples.numel():
                yield chunk.samples

    def feed(self, token_ids: Sequence[int]) -> torch.Tensor:
        new = list(token_ids)
        self.tokens.extend(new)  # our copy (the limits, the prompt); the stage's SpokenAnswer gets them in `change`
        return torch.cat([torch.zeros(0), *self._chunks(lambda r: r.prompt.extend(new))])

    def finish(self) -> torch.Tensor:
        """The answer is complete: speak the rest. Returns the remaining samples."""
        return torch.cat([torch.zeros(0), *self.finish_chunks()])

    def finish_chunks(self) -> Iterator[torch.Tensor]:
        """finish() chunk by chunk: after the text the Talker still speaks for as long as the limits allow
        (most of a long answer's audio), and a streaming client should hear it as it is made."""
        self.thinker_done = True
        limit = self._frame_limit()

        def end(r: Any) -> None:
            r.prompt.end_text()
            r.params.max_frames = min(r.params.max_frames, limit)

        return self._chunks(end)

    def close(self) -> None:
        """Withdraws the answer (its request was cancelled): the stage drops it and frees its KV blocks."""
        if self.sink is not None and not self.ended:
            self.stage.abort(self.request_id)
        self.ended = True

    @property
    def codes(self) -> torch.Tensor:
        """All frames so far [T, G]."""
        if not self.frames:
            return torch.zeros(0, self.model.args.talker.num_code_groups, dtype=torch.long)
        return torch.stack(self.frames)


def talker_stage(model: Any, kv_positions: int, block_size: int = 16, max_batch: int = 16) -> Any:
    """The shared speech stage of a served Omni model: its Talker's batched loop on its own thread, with a
    paged KV pool of kv_positions Talker positions (each answer reserves its prompt plus its max frames)."""
    engine = SpeechEngine(model, model.code2wav, kv_blocks=-(-kv_positions // block_size), block_size=block_size,
                          max_batch=max_batch)
    return SpeechService(engine, name="omni-talker")


PRIVATE_BLOCK = 16

__all__ = ["AnswerSpeech", "SpeechChunking", "SpeechLimits", "answer_request", "prompt_states", "talker_stage"]
