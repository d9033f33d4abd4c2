"""Qwen3-Omni-MoE (model_type "qwen3_omni_moe"): the Thinker (AuT audio encoder, Qwen3-VL vision tower, MoE
text decoder with interleaved M-RoPE and DeepStack) and, on Instruct checkpoints, the Talker and Code2Wav
(qwen3_omni_moe_talker.py, qwen3_omni_moe_code2wav.py) that turn its answer into 24 kHz speech.

Decisions:
- One config.json nests `thinker_config` (text, vision and audio sub-configs, multimodal token ids),
  `talker_config` and `code2wav_config`. `enable_audio_output: false` (the Thinking and Captioner
  checkpoints) builds the Thinker only, and such checkpoints hold only `thinker.*` tensors.
- Everything reuses the Qwen3 family's modules: the audio tower is Qwen3-ASR's AuT encoder (same convs,
  windows and sinusoids; only its projector lives inside the tower as proj1/proj2), the vision tower is
  Qwen3-VL's (DeepStack mergers named `merger_list` here), the decoder is Qwen3-VL-MoE's text model. The
  engine sees the Thinker as any multimodal causal LM: `forward`, `compute_logits`, `plan_multimodal`,
  `encode_images`, `encode_audio`.
- Checkpoint names are transformers' (`thinker.model.*`, `thinker.visual.*`, `thinker.audio_tower.*`,
  `thinker.lm_head.*`, `talker.*`, `code2wav.*`); `sanitize` renames the two places where our shared modules
  use other names (`proj1/2` -> `audio_projector.linear_1/2`, `merger_list` -> `deepstack_merger_list`,
  the mergers' `ln_q`/`mlp.0`/`mlp.2` -> `norm`/`linear_fc1`/`linear_fc2`); it is idempotent.
- Positions follow transformers' get_rope_index, for text, images, audio, videos and videos with their audio
  track interleaved (qwen3_omni_moe_plan.py).
- Audio rows carry zero DeepStack features so a step that mixes audio and image rows stays one tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from qwenstack.config import ModelArgs
from qwenstack.errors import ConfigError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec, lm_logits
from qwenstack.models.layers import SwiGLU
from qwenstack.models.moe import SparseMoE
from qwenstack.models.qwen3_asr_audio import AudioEncoder, AudioEncoderArgs, AudioProjector, audio_token_count
from qwenstack.models.qwen3_moe import Qwen3MoeArgs
from qwenstack.models.qwen3_omni_moe_plan import plan_placements, rope_positions
from qwenstack.models.qwen3_vl import Qwen3VLTextModel, _MropeValidation, encode_with_vision_tower
from qwenstack.models.qwen3_vl_vision import Qwen3VLVisionModel, VisionArgs
from qwenstack.multimodal.inputs import (
    AudioInput, AudioPlacement, EncodedImage, ImageInput, ImagePlacement, MultimodalBatch, MultimodalPlan,
)

# transformers' checkpoint names -> ours; the first matching rule applies.
_RENAMES = (
    (re.compile(r"^thinker\.audio_tower\.proj([12])\."), r"thinker.audio_projector.linear_\1."),
    (re.compile(r"^thinker\.visual\.merger_list\."), "thinker.visual.deepstack_merger_list."),
)
# Omni's patch mergers keep Qwen2.5-VL's names (ln_q, mlp.0, mlp.2) for Qwen3-VL's computation.
_MERGER_PARTS = (
    (re.compile(r"^(thinker\.visual\.(?:deepstack_merger_list\.\d+|merger))\.ln_q\."), r"\1.norm."),
    (re.compile(r"^(thinker\.visual\.(?:deepstack_merger_list\.\d+|merger))\.mlp\.0\."), r"\1.linear_fc1."),
    (re.compile(r"^(thinker\.visual\.(?:deepstack_merger_list\.\d+|merger))\.mlp\.2\."), r"\1.linear_fc2."),
)


@dataclass(kw_only=True)
class OmniTextArgs(_MropeValidation, Qwen3MoeArgs):
    """The Thinker's text_config: Qwen3-MoE fields plus the M-RoPE split."""

    model_type: ClassVar[str] = "qwen3_omni_moe"

    def validate(self, config: dict[str, Any]) -> None:
        super().validate(config)
        self.check_mrope(config)


@dataclass(kw_only=True)
class ThinkerArgs(ModelArgs):
    """`thinker_config`: the three sub-configs and the token ids the Thinker reacts to."""

    model_type: ClassVar[str] = "qwen3_omni_moe_thinker"
    derived_fields: ClassVar[tuple[str, ...]] = ("text", "vision", "audio")
    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    audio_config: dict[str, Any]
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio_start_token_id: int
    vision_start_token_id: int | None = None
    position_id_per_seconds: int = 25
    tie_word_embeddings: bool = False
    text: OmniTextArgs = field(init=False)
    vision: VisionArgs = field(init=False)
    audio: AudioEncoderArgs = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        self.text = OmniTextArgs.from_dict({**self.text_config, "tie_word_embeddings": self.tie_word_embeddings})
        self.vision = VisionArgs.from_dict(self.vision_config)
        self.audio = AudioEncoderArgs.from_dict(self.audio_config)
        for name, width in (("vision_config.out_hidden_size", self.vision.out_hidden_size),
                            ("audio_config.output_dim", self.audio.output_dim)):
            if width != self.text.hidden_size:
                raise ConfigError(f"{name} ({width}) must equal the text hidden_size ({self.text.hidden_size})")


@dataclass(kw_only=True)
class Qwen3OmniMoeArgs(ModelArgs):
    """The whole config.json. The Talker and Code2Wav configs are parsed only when audio output is enabled."""

    model_type: ClassVar[str] = "qwen3_omni_moe"
    derived_fields: ClassVar[tuple[str, ...]] = ("thinker", "talker", "code2wav")
    thinker_config: dict[str, Any]
    talker_config: dict[str, Any] = field(default_factory=dict)
    code2wav_config: dict[str, Any] = field(default_factory=dict)
    enable_audio_output: bool = True
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    system_token_id: int = 8948
    user_token_id: int = 872
    assistant_token_id: int = 77091
    thinker: ThinkerArgs = field(init=False)
    talker: Any = field(init=False)
    code2wav: Any = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        self.thinker = ThinkerArgs.from_dict(self.thinker_config)
        self.talker = self.code2wav = None
        if self.enable_audio_output:
            from qwenstack.models.qwen3_omni_moe_code2wav import Code2WavArgs
            from qwenstack.models.qwen3_omni_moe_talker import TalkerArgs

            if not self.talker_config or not self.code2wav_config:
                raise ConfigError("enable_audio_output is true but config.json lacks talker_config or code2wav_config")
            self.talker = TalkerArgs.from_dict(self.talker_config)
            self.code2wav = Code2WavArgs.from_dict(self.code2wav_config)
            if self.talker.thinker_hidden_size != self.thinker.text.hidden_size:
                raise ConfigError("talker_config.thinker_hidden_size must equal the Thinker's hidden_size")
            if not 0 <= self.talker.accept_hidden_layer <= self.thinker.text.num_hidden_layers:
                raise ConfigError("talker_config.accept_hidden_layer is outside the Thinker's layers")

    # What the engine (and the audio prompter) reads from any model's args.
    @property
    def audio_token_id(self) -> int:
        return self.thinker.audio_token_id

    @property
    def vocab_size(self) -> int:
        return self.thinker.text.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.thinker.text.max_position_embeddings

    @property
    def num_hidden_layers(self) -> int:
        return self.thinker.text.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.thinker.text.hidden_size


class Thinker(nn.Module):
    """Module names equal the checkpoint's under `thinker.` (after `sanitize`)."""

    def __init__(self, args: ThinkerArgs) -> None:
        super().__init__()
        self.args = args
        self.audio_tower = AudioEncoder(args.audio)
        self.audio_projector = AudioProjector(args.audio)
        self.visual = Qwen3VLVisionModel(args.vision)
        self.model = Qwen3VLTextModel(args.text, self.make_mlp)
        text = args.text
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        a = self.args.text
        if not a.is_sparse_layer(layer_idx):
            return SwiGLU(a.hidden_size, a.intermediate_size)
        # Experts load per expert (what transformers saves and Qwen publishes for Omni) or fused.
        return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob)


class Qwen3OmniMoeForConditionalGeneration(nn.Module):
    args_class: ClassVar[type[Qwen3OmniMoeArgs]] = Qwen3OmniMoeArgs

    def __init__(self, args: Qwen3OmniMoeArgs) -> None:
        super().__init__()
        self.args = args
        self.thinker = Thinker(args.thinker)
        self.has_talker = args.enable_audio_output
        if self.has_talker:
            from qwenstack.models.qwen3_omni_moe_code2wav import Code2Wav
            from qwenstack.models.qwen3_omni_moe_talker import Talker

            self.talker = Talker(args.talker)
            self.code2wav = Code2Wav(args.code2wav)
        ignored = [r"thinker\.lm_head\.weight"] if args.thinker.tie_word_embeddings else []
        if not self.has_talker:  # an Instruct checkpoint served as text only still loads
            ignored += [r"talker\..*", r"code2wav\..*"]
        self.ignored_checkpoint_patterns: tuple[str, ...] = tuple(ignored)

    @staticmethod
    def sanitize(name: str) -> str:
        """A transformers checkpoint name -> ours (unchanged where the module names already agree)."""
        for pattern, replacement in _RENAMES:
            if pattern.match(name):
                name = pattern.sub(replacement, name, count=1)
                break
        for pattern, replacement in _MERGER_PARTS:
            if pattern.match(name):
                return pattern.sub(replacement, name, count=1)
        return name

    # --- CausalLM (the Thinker) -----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,  # [T] for text only, or [3, T]
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor] | None,
        multimodal: MultimodalBatch | None = None,
    ) -> torch.Tensor:
        return self.thinker.model(input_ids, positions, batch, kv_caches, multimodal=multimodal)

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(hidden, self.thinker.lm_head, self.thinker.model.embed_tokens, token_ids)

    def kv_cache_spec(self) -> KVCacheSpec:
        text = self.args.thinker.text
        assert text.num_key_value_heads is not None and text.head_dim is not None
        return KVCacheSpec(text.num_hidden_layers, text.num_key_value_heads, text.head_dim)

    def thinker_states(self, input_ids: torch.Tensor, positions: torch.Tensor, multimodal: MultimodalBatch | None,
                       layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One uncached pass over a prompt [T]: its input embeddings (multimodal rows injected) and the output
        of decoder layer `layer` - 1 (the input for layer 0), before DeepStack, as transformers records
        hidden_states[layer]. The Talker reads the latter at multimodal positions."""
        lm = self.thinker.model
        x = lm.embed_tokens(input_ids)
        if multimodal is not None:
            x = x.index_copy(0, multimodal.rows, multimodal.embeds.to(x.dtype))
        embeds, picked = x, x
        batch = AttentionBatch.for_prompts([input_ids.shape[0]])
        num_deepstack = 0 if multimodal is None else multimodal.deepstack.shape[0]
        for i, block in enumerate(lm.layers[:layer]):
            x = block(x, positions, batch, None)
            picked = x
            if i < num_deepstack:
                assert multimodal is not None
                x = x.index_add(0, multimodal.rows, multimodal.deepstack[i].to(x.dtype))
        return embeds, picked

    # --- multimodal hooks (the engine's MultimodalModel protocol) ---------------------------------------

    @property
    def merge_size(self) -> int:
        return self.args.thinker.vision.spatial_merge_size

    def audio_tokens(self, audio: AudioInput) -> int:
        """Placeholder tokens the prompt needs for this clip."""
        return audio_token_count(audio.num_frames, self.args.thinker.audio.chunk_frames)

    def plan_multimodal(self, prompt_token_ids: Sequence[int], images: Sequence[ImageInput],
                        audios: Sequence[AudioInput] = ()) -> MultimodalPlan:
        """Places images, clips and videos (their frame groups among `images`) on their placeholder runs and
        computes the prompt's 3-D positions (qwen3_omni_moe_plan.py). Raises RequestError when prompt and
        inputs disagree."""
        placements = plan_placements(self, prompt_token_ids, images, audios)
        positions, delta = self.rope_positions(len(prompt_token_ids), placements)
        return MultimodalPlan(placements, positions, delta)

    def rope_positions(self, prompt_len: int, placements: Sequence[ImagePlacement | AudioPlacement]
                       ) -> tuple[torch.Tensor, int]:
        """[3, prompt_len] positions and the rope delta of generated tokens (transformers' get_rope_index)."""
        return rope_positions(prompt_len, placements, self.merge_size, self.args.thinker.position_id_per_seconds)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> list[EncodedImage]:
        """Runs the vision tower once over several images; per image, embeddings [n, H] and DeepStack [k, n, H]."""
        return encode_with_vision_tower(self.thinker.visual, images, self.merge_size)

    @torch.inference_mode()
    def encode_audio(self, audios: Sequence[AudioInput]) -> list[EncodedImage]:
        """Runs the audio encoder and projector once over several clips: per clip, rows [tokens, hidden] and
        zero DeepStack features (so audio and image rows of one step stack into one tensor)."""
        encoded = self.thinker.audio_tower([a.features for a in audios])
        projected = self.thinker.audio_projector(torch.cat(encoded)).split([e.shape[0] for e in encoded])
        k = len(self.args.thinker.vision.deepstack_visual_indexes)
        return [EncodedImage(p, p.new_zeros(k, p.shape[0], p.shape[1])) for p in projected]


__all__ = ["Qwen3OmniMoeArgs", "Qwen3OmniMoeForConditionalGeneration", "ThinkerArgs"]
