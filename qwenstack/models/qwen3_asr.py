"""Qwen3-ASR (model_type "qwen3_asr"): the AuT audio encoder of qwen3_asr_audio.py feeding the Qwen3 decoder.

Decisions:
- Two published layouts, one module tree. transformers' (`Qwen/Qwen3-ASR-*-hf`): config.json holds
  `audio_config`, `text_config`, `audio_token_id` at the top; keys `model.audio_tower.*`,
  `model.multi_modal_projector.linear_{1,2}.*`, `model.language_model.*`, `lm_head.weight`. The original
  (`Qwen/Qwen3-ASR-*`, read by the `qwen-asr` package) nests them under `thinker_config`; keys
  `thinker.audio_tower.*` with the projector inside as `proj1`/`proj2`, `thinker.model.*`,
  `thinker.lm_head.*`. The config is read from wherever it sits, and `sanitize` renames the original keys
  to transformers' before the strict loader checks coverage, so both layouts load with the same checks.
- Tying: the top-level `tie_word_embeddings`, else the thinker's or the text config's; transformers'
  Qwen3ASRConfig ties by default (and the released sizes tie), so absent everywhere means tied.
- The text decoder is the shared Qwen3 one with plain 1-D rotary. Audio placeholders (`audio_token_id`,
  one per encoder output row: 13 per second of audio) get the projected encoder rows in place of their
  token embeddings. The engine's multimodal step hands 3-D positions when a batch holds audio; the three
  rows are equal here, so the first is used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from qwenstack.config import ModelArgs
from qwenstack.errors import ConfigError, RequestError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec, lm_logits, output_head
from qwenstack.models.layers import SwiGLU
from qwenstack.models.qwen3 import Qwen3Args, Qwen3Model
from qwenstack.models.qwen3_asr_audio import AudioEncoder, AudioEncoderArgs, AudioProjector, audio_token_count
from qwenstack.models.qwen3_vl import _token_runs  # placeholder runs: the same rule as for images
from qwenstack.multimodal.inputs import AudioInput, AudioPlacement, EncodedImage, MultimodalBatch, MultimodalPlan

# Original (thinker) checkpoint names -> transformers' names; the first matching rule applies.
_THINKER_RENAMES = (
    (re.compile(r"^thinker\.audio_tower\.proj([12])\."), r"model.multi_modal_projector.linear_\1."),
    (re.compile(r"^thinker\.audio_tower\."), "model.audio_tower."),
    (re.compile(r"^thinker\.model\."), "model.language_model."),
    (re.compile(r"^thinker\.lm_head\."), "lm_head."),
)


@dataclass(kw_only=True)
class Qwen3ASRArgs(ModelArgs):
    """The whole config.json, in transformers' layout or the original one (everything under thinker_config)."""

    model_type: ClassVar[str] = "qwen3_asr"
    derived_fields: ClassVar[tuple[str, ...]] = ("text", "audio")
    audio_token_id: int | None = None
    audio_start_token_id: int | None = None
    tie_word_embeddings: bool | None = None
    audio_config: dict[str, Any] = field(default_factory=dict)
    text_config: dict[str, Any] = field(default_factory=dict)
    thinker_config: dict[str, Any] = field(default_factory=dict)
    text: Qwen3Args = field(init=False)
    audio: AudioEncoderArgs = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        thinker = self.thinker_config
        if thinker:
            self.audio_config = self.audio_config or thinker.get("audio_config") or {}
            self.text_config = self.text_config or thinker.get("text_config") or {}
            if self.audio_token_id is None:
                self.audio_token_id = thinker.get("audio_token_id", thinker.get("audio_token_index"))
            if self.audio_start_token_id is None:
                self.audio_start_token_id = thinker.get("audio_start_token_id")
        if not self.audio_config or not self.text_config:
            raise ConfigError("config.json for qwen3_asr needs 'audio_config' and 'text_config' "
                              "(at the top level or under 'thinker_config')")
        if self.audio_token_id is None:
            raise ConfigError("config.json for qwen3_asr has no 'audio_token_id'")
        if self.tie_word_embeddings is None:
            for source in (thinker, self.text_config):
                if source.get("tie_word_embeddings") is not None:
                    self.tie_word_embeddings = bool(source["tie_word_embeddings"])
                    break
            else:
                self.tie_word_embeddings = True
        text = {**self.text_config, "tie_word_embeddings": self.tie_word_embeddings}
        self.text = Qwen3Args.from_dict(text)
        self.audio = AudioEncoderArgs.from_dict(self.audio_config)
        if self.audio.output_dim != self.text.hidden_size:
            raise ConfigError(f"audio_config.output_dim ({self.audio.output_dim}) must equal the text hidden_size "
                              f"({self.text.hidden_size}): audio rows replace token embeddings")

    # What the engine reads from any model's args.
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @property
    def num_hidden_layers(self) -> int:
        return self.text.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size


class Qwen3ASRModel(nn.Module):
    def __init__(self, args: Qwen3ASRArgs, make_mlp: Any) -> None:
        super().__init__()
        self.audio_tower = AudioEncoder(args.audio)
        self.multi_modal_projector = AudioProjector(args.audio)
        self.language_model = Qwen3Model(args.text, make_mlp)

    # The token embedding under the name the CPU linear preparation looks for (model.model.embed_tokens), so
    # a tied lm_head gets the fast packed form as in the text models; it is not a parameter of its own.
    @property
    def embed_tokens(self) -> nn.Module:
        return self.language_model.embed_tokens

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "embed_tokens":  # nn.Module would register it here, beside the decoder's own
            self.language_model.embed_tokens = value
            return
        super().__setattr__(name, value)


class Qwen3ASRForConditionalGeneration(nn.Module):
    args_class: ClassVar[type[Qwen3ASRArgs]] = Qwen3ASRArgs

    def __init__(self, args: Qwen3ASRArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Qwen3ASRModel(args, self.make_mlp)
        self.lm_head, self.ignored_checkpoint_patterns = output_head(args.text.hidden_size, args.text.vocab_size,
                                                                    args.tie_word_embeddings)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return SwiGLU(self.args.text.hidden_size, self.args.text.intermediate_size)

    @staticmethod
    def sanitize(name: str) -> str:
        """A checkpoint tensor name in the original thinker layout -> transformers' name (others unchanged)."""
        for pattern, replacement in _THINKER_RENAMES:
            if pattern.match(name):
                return pattern.sub(replacement, name, count=1)
        return name

    # --- CausalLM -----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,  # [T], or [3, T] with equal rows when the batch holds audio
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor] | None,
        multimodal: MultimodalBatch | None = None,
    ) -> torch.Tensor:
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids)
        if multimodal is not None:
            x = x.index_copy(0, multimodal.rows, multimodal.embeds.to(x.dtype))
        if positions.dim() == 2:
            positions = positions[0]
        return lm(input_ids, positions, batch, kv_caches, inputs_embeds=x)

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(hidden, self.lm_head, self.model.language_model.embed_tokens, token_ids)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec.of_decoder(self.args.text)

    # --- multimodal hooks (the engine's MultimodalModel protocol) ---------------------------------------

    def audio_tokens(self, audio: AudioInput) -> int:
        """Placeholder tokens the prompt needs for this clip."""
        return audio_token_count(audio.num_frames, self.args.audio.chunk_frames)

    def plan_multimodal(self, prompt_token_ids: Sequence[int], images: Sequence[Any],
                        audios: Sequence[AudioInput] = ()) -> MultimodalPlan:
        """Places each clip on its run of audio placeholders. Raises RequestError on any mismatch."""
        if images:
            raise RequestError("this model takes audio, not images")
        runs = _token_runs(prompt_token_ids, int(self.args.audio_token_id))  # type: ignore[arg-type]
        if len(runs) != len(audios):
            raise RequestError(f"the prompt has {len(runs)} audio placeholder run(s) but {len(audios)} clip(s) "
                               "were given")
        placements = []
        for i, ((offset, length), audio) in enumerate(zip(runs, audios)):
            expected = self.audio_tokens(audio)
            if length != expected:
                raise RequestError(f"audio clip {i} needs {expected} placeholder tokens, the prompt has {length}")
            placements.append(AudioPlacement(offset, length, audio))
        n = len(prompt_token_ids)
        return MultimodalPlan(placements, torch.arange(n, dtype=torch.long).expand(3, -1), 0)  # type: ignore[arg-type]

    @torch.inference_mode()
    def encode_audio(self, audios: Sequence[AudioInput]) -> list[EncodedImage]:
        """Runs the audio encoder and projector once over several clips: per clip, rows [tokens, hidden]."""
        encoded = self.model.audio_tower([a.features for a in audios])
        projected = self.model.multi_modal_projector(torch.cat(encoded)).split([e.shape[0] for e in encoded])
        return [EncodedImage(p, p.new_zeros(0, p.shape[0], p.shape[1])) for p in projected]


__all__ = ["Qwen3ASRArgs", "Qwen3ASRForConditionalGeneration"]
