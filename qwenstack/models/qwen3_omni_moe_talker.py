"""Qwen3-Omni's Talker: an MoE decoder that reads the Thinker's embeddings and states and writes speech codes,
one frame (num_code_groups codes) per step, with the code predictor filling codes 1..G-1 of each frame.

Decisions:
- The decoder is the shared Qwen3 DecoderLayer (GQA, QK-RMSNorm) with interleaved M-RoPE and, in every layer,
  a sparse MoE plus a sigmoid-gated shared expert (Qwen3-Next's SharedExpertMoE). Its inputs are always
  embeddings: `codec_embedding` rows plus projected Thinker rows. The code predictor is Qwen3-TTS's (same
  module names, run as a per-frame sub-decoder); it needs the Talker's width, which the released configs have.
- The prompt mirrors transformers 5.24 `Qwen3OmniMoeForConditionalGeneration.generate`: the user turns only
  (text positions get text_projection(Thinker embedding), audio/image/video positions get
  hidden_projection(Thinker hidden state of layer accept_hidden_layer)), then the assistant head
  `<|im_start|>assistant\\n` + tts_pad x4 + tts_bos + the first answer token, each summed with the codec
  prefix (zeros x3, nothink, think_bos, think_eos, speaker, pad, bos).
- Step j adds the projected embedding of answer token j + 1 to the summed codes of the previous frame; the
  token after the last fed answer token is replaced by tts_eos, and past it tts_pad is added. So step j can
  run as soon as the Thinker has produced token j + 2 or finished: this is what lets speech start while
  the text is still being written (`SpokenAnswer.step_text` says None until then).
- Sampling follows transformers: the top 1024 ids suppressed except codec EOS, repetition penalty over the
  codes generated so far; codes 1..G-1 drawn greedily when the first code is, else with top-k 50 / top-p 0.8.
- The Talker is stepped by Qwen3-TTS's batched speech loop (tts/engine.py SpeechEngine: paged KV, continuous
  batching, the code predictor once per step for all requests, per-request seeded sampling): `SpokenAnswer`
  is the prompt that loop reads, `speech_params` its sampling.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from qwenstack.config import ModelArgs
from qwenstack.errors import ConfigError, RequestError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec
from qwenstack.models.layers import RMSNorm
from qwenstack.models.qwen3 import DecoderLayer
from qwenstack.models.qwen3_moe import Qwen3MoeArgs
from qwenstack.models.qwen3_next import SharedExpertMoE
from qwenstack.models.qwen3_tts import CodePredictor, CodePredictorArgs, ResizeMLP
from qwenstack.models.qwen3_vl import MRotaryEmbedding, _MropeValidation


@dataclass(kw_only=True)
class TalkerTextArgs(_MropeValidation, Qwen3MoeArgs):
    model_type: ClassVar[str] = "qwen3_omni_moe_talker"
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}
    shared_expert_intermediate_size: int
    norm_topk_prob: bool = False  # transformers' Talker default, and what the released config says

    def validate(self, config: dict[str, Any]) -> None:
        super().validate(config)
        self.check_mrope(config)


@dataclass(kw_only=True)
class TalkerArgs(ModelArgs):
    """`talker_config` of a Qwen3-Omni config.json."""

    model_type: ClassVar[str] = "qwen3_omni_moe_talker"
    derived_fields: ClassVar[tuple[str, ...]] = ("text", "code_predictor")
    text_config: dict[str, Any]
    code_predictor_config: dict[str, Any]
    num_code_groups: int
    thinker_hidden_size: int
    accept_hidden_layer: int
    codec_eos_token_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    codec_pad_id: int
    codec_bos_id: int
    speaker_id: dict[str, int] = field(default_factory=dict)
    text: TalkerTextArgs = field(init=False)
    code_predictor: CodePredictorArgs = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        self.text = TalkerTextArgs.from_dict(self.text_config)
        self.code_predictor = CodePredictorArgs.from_dict(
            {**self.code_predictor_config, "num_code_groups": self.num_code_groups})
        if self.code_predictor.hidden_size != self.text.hidden_size:
            raise ConfigError("the code predictor's hidden_size must equal the Talker's: its code embeddings are "
                              "summed into the Talker's next input")
        if not self.speaker_id:
            raise ConfigError("talker_config.speaker_id is empty: the checkpoint names no voice")

    @property
    def voices(self) -> list[str]:
        return sorted(self.speaker_id)


class TalkerModel(nn.Module):
    def __init__(self, args: TalkerTextArgs) -> None:
        super().__init__()
        assert args.head_dim is not None
        rotary = MRotaryEmbedding(args.rope, args.head_dim)
        self.layers = nn.ModuleList([
            DecoderLayer(args, SharedExpertMoE(args, args.shared_expert_intermediate_size), rotary)
            for _ in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.codec_embedding = nn.Embedding(args.vocab_size, args.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[torch.Tensor] | None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, batch, None if kv_caches is None else kv_caches[i])
        return self.norm(x)


class Talker(nn.Module):
    """Names equal the checkpoint's under `talker.`."""

    def __init__(self, args: TalkerArgs) -> None:
        super().__init__()
        self.args = args
        text = args.text
        self.model = TalkerModel(text)
        self.text_projection = ResizeMLP(args.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.hidden_projection = ResizeMLP(args.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.codec_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.code_predictor = CodePredictor(args.code_predictor, text.hidden_size)

    def suppressed_codes(self) -> list[int]:
        """The top 1024 ids are control codes: never sampled, except EOS."""
        v, eos = self.args.text.vocab_size, self.args.codec_eos_token_id
        return [i for i in range(max(0, v - 1024), v) if i != eos]

    def frame_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the G code embeddings of frames [N, G] -> [N, H]."""
        out = self.model.codec_embedding(codes[:, 0])
        for g in range(1, codes.shape[1]):
            out = out + self.code_predictor.model.codec_embedding[g - 1](codes[:, g])
        return out

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[torch.Tensor] | None) -> torch.Tensor:
        return self.model(embeds, positions, batch, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.codec_head(hidden)

    def kv_cache_spec(self) -> KVCacheSpec:
        a = self.args.text
        assert a.num_key_value_heads is not None and a.head_dim is not None
        return KVCacheSpec(a.num_hidden_layers, a.num_key_value_heads, a.head_dim)


@dataclass
class TalkerPrompt:
    """What one request's Talker starts from."""

    prefill: torch.Tensor  # [L, H] input embeddings of the prompt (user turns + assistant head)
    prefill_positions: torch.Tensor  # [3, L]
    rope_delta: int  # decode step j sits at position L + j + rope_delta
    tts_eos: torch.Tensor  # [H]
    tts_pad: torch.Tensor  # [H]


def build_talker_prompt(model: Any, prompt_ids: Sequence[int], first_token: int, speaker: str,
                        thinker_embeds: torch.Tensor, thinker_hidden: torch.Tensor,
                        placements: Sequence[Any] = ()) -> TalkerPrompt:
    """The Talker prompt of one request; first_token is the first token after the assistant head (of the prompt,
    e.g. an empty think block, or of the answer). model: Qwen3OmniMoeForConditionalGeneration; thinker_embeds and
    thinker_hidden [S, Hthinker] cover the prompt (the latter is read at multimodal positions only);
    placements: the Thinker plan's image/audio placements (for the Talker's own M-RoPE positions)."""
    a, talker = model.args, model.talker
    ta = talker.args
    voice = speaker.lower()
    if voice not in ta.speaker_id:
        raise RequestError(f"voice '{speaker}' is not one of this model's voices: {', '.join(ta.voices)}")
    ids = list(prompt_ids)
    th = a.thinker
    device = thinker_embeds.device
    # Which prompt positions belong to a user turn: the role token after the latest <|im_start|>.
    user_rows, latest = [], 0
    for i, t in enumerate(ids):
        if t == a.im_start_token_id:
            latest = i
        if ids[min(latest + 1, len(ids) - 1)] == a.user_token_id:
            user_rows.append(i)
    heads = [i for i in range(len(ids) - 1) if ids[i] == a.im_start_token_id and ids[i + 1] == a.assistant_token_id]
    if not heads or heads[-1] + 3 > len(ids):
        raise RequestError("the prompt has no assistant head '<|im_start|>assistant\\n' to speak after")
    mm = torch.tensor([t in (th.audio_token_id, th.image_token_id, th.video_token_id) for t in ids], device=device)
    rows = torch.tensor(user_rows, dtype=torch.long, device=device)
    user_mm = mm[rows]
    user_part = torch.empty(len(user_rows), ta.text.hidden_size, dtype=thinker_embeds.dtype, device=device)
    if bool(user_mm.any()):
        user_part[user_mm] = talker.hidden_projection(thinker_hidden[rows[user_mm]])
    user_part[~user_mm] = talker.text_projection(thinker_embeds[rows[~user_mm]])

    embed = model.thinker.model.embed_tokens
    special = torch.tensor([a.tts_bos_token_id, a.tts_eos_token_id, a.tts_pad_token_id], device=device)
    tts_bos, tts_eos, tts_pad = talker.text_projection(embed(special))
    head_ids = torch.tensor(ids[heads[-1]:heads[-1] + 3] + [first_token], device=device)
    head = talker.text_projection(embed(head_ids))  # [4, H]: <|im_start|> assistant \n first
    text_rows = torch.cat([head[:3], tts_pad.expand(4, -1), tts_bos[None], head[3:4]])
    codec_ids = torch.tensor([ta.codec_nothink_id, ta.codec_think_bos_id, ta.codec_think_eos_id,
                              ta.speaker_id[voice], ta.codec_pad_id, ta.codec_bos_id], device=device)
    codec_rows = torch.cat([text_rows.new_zeros(3, text_rows.shape[1]), talker.model.codec_embedding(codec_ids)])
    prefill = torch.cat([user_part, text_rows + codec_rows])

    # M-RoPE over the Talker's own sequence: the user tokens' placements, shifted to their new indices.
    where = {p: i for i, p in enumerate(user_rows)}
    moved = [dataclasses.replace(p, offset=where[p.offset]) for p in placements if p.offset in where]
    positions, delta = model.rope_positions(prefill.shape[0], moved)
    return TalkerPrompt(prefill, positions.to(device), delta, tts_eos, tts_pad)


@dataclass
class TalkerSampling:
    """transformers' Talker defaults (temperature 0 is greedy for the whole frame)."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    max_frames: int = 4095  # transformers' talker_max_new_tokens 4096: its last sampled code is never decoded
    seed: int | None = None


def speech_params(sampling: TalkerSampling, first_chunk_frames: int, chunk_frames: int) -> Any:
    """The speech loop's SpeechParams for one answer: codes 1..G-1 greedy when the first code is, else top-k
    50 / top-p 0.8 at temperature 0.9 (transformers' subtalker settings); the Talker may stop at any frame."""
    from qwenstack.tts.engine import SpeechParams

    s = sampling
    return SpeechParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        repetition_penalty=s.repetition_penalty,
                        subtalker_temperature=0.0 if s.temperature == 0 else 0.9, subtalker_top_k=50,
                        subtalker_top_p=0.8, seed=s.seed if s.seed is not None else 0, max_frames=s.max_frames,
                        first_chunk_frames=first_chunk_frames, chunk_frames=chunk_frames, eos_blocked_frames=0)


class SpokenAnswer:
    """One answer as the Talker sees it while the Thinker writes it: the speech loop's prompt
    (tts/engine.py TalkerInput). `tokens` are the answer's tokens so far (those of the prompt after the
    assistant head first); `extend` and `end_text` are called on the loop's thread."""

    def __init__(self, prompt: TalkerPrompt, tokens: Sequence[int], eos: Sequence[int],
                 project: Callable[[list[int]], torch.Tensor]) -> None:
        """project: answer token ids -> their Talker text rows [n, H] (text_projection of Thinker embeddings)."""
        self.prompt, self.prefill = prompt, prompt.prefill
        self.tokens = list(tokens)
        self.eos = frozenset(eos)
        self.project = project
        self.text_done = False
        self._rows: list[torch.Tensor] = []  # the projections of tokens[:len(_rows)], made in batches

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def end_text(self) -> None:
        self.text_done = True

    def positions(self, start: int, n: int) -> torch.Tensor:
        if start == 0:
            return self.prompt.prefill_positions[:, :n]
        # after the prompt, all three M-RoPE rows advance together, shifted by the prompt's rope delta
        return torch.arange(start, start + n).expand(3, n) + self.prompt.rope_delta

    def _projected(self, index: int) -> torch.Tensor:
        if index >= len(self._rows):
            with torch.inference_mode():  # also asked from has_work(), outside the step's inference mode
                self._rows.extend(self.project(self.tokens[len(self._rows):]).unbind(0))
        return self._rows[index]

    def step_text(self, step: int) -> torch.Tensor | None:
        nxt, n = step + 1, len(self.tokens)  # the answer token this step speaks
        if nxt < n and self.tokens[nxt] in self.eos:
            return self.prompt.tts_eos  # an end token is always the last one
        if nxt < n - 1:
            return self._projected(nxt)  # another token follows: not the last
        if not self.text_done:
            return None
        # The answer ended: its last token is never fed to the Thinker, tts_eos takes its place, then tts_pad.
        return self.prompt.tts_eos if nxt == n - 1 else self.prompt.tts_pad


def talker_text_rows(model: Any, tokens: list[int]) -> torch.Tensor:
    """text_projection of answer tokens' Thinker embeddings [n, H]."""
    embed = model.thinker.model.embed_tokens
    return model.talker.text_projection(embed(torch.tensor(tokens, dtype=torch.long, device=embed.weight.device)))


__all__ = ["SpokenAnswer", "Talker", "TalkerArgs", "TalkerPrompt", "TalkerSampling", "build_talker_prompt",
           "speech_params", "talker_text_rows"]
