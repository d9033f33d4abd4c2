"""Qwen3-VL (model_type "qwen3_vl") and Qwen3-VL-MoE ("qwen3_vl_moe"): the vision tower of
qwen3_vl_vision.py feeding a Qwen3 (or Qwen3-MoE) text decoder with interleaved M-RoPE and DeepStack.

Decisions:
- config.json nests `text_config` and `vision_config`; the image and vision token ids sit at the top level.
  The text config is parsed by the Qwen3 / Qwen3-MoE args, so the decoder is the shared Qwen3 one (same
  attention, MLP, MoE); only its rotary is swapped for M-RoPE and its layer loop adds DeepStack.
- Checkpoint names are the published ones: `model.visual.*`, `model.language_model.*`, `lm_head.weight`
  (absent when tied). Tying follows the top-level `tie_word_embeddings`, as transformers does.
- MoE experts are stored fused. Published checkpoints hold them transposed ([E, H, 2I], [E, I, H]);
  transformers 5.24's save_pretrained writes its in-memory layout ([E, 2I, H], [E, H, I]). Both load; the
  shapes decide, and square matrices (H == 2I or H == I), which cannot say, are read as transformers reads
  them. Qwen3-VL-MoE has no norm_topk_prob: it always renormalises the top-k weights.
- Interleaved M-RoPE: positions are [3, T] (temporal, height, width). Frequency j takes its angle from the
  height stream when j % 3 == 1 and j < 3 * mrope_section[1], from width when j % 3 == 2 and
  j < 3 * mrope_section[2], else from the temporal stream. When the three streams are equal (text) this is
  the plain 1-D rotary, so text-only batches pass 1-D positions and skip the recomposition.
- 3-D positions follow transformers' get_rope_index: text advances by one per token; an image of grid
  (t, h, w) at running position p gives its tokens (p, p + row, p + col) on the merged grid, and the text
  after it continues from p + max(h, w) / merge. Generated tokens sit at index + rope_delta.
- The engine-facing hooks (`plan_multimodal`, `encode_images`, and `forward(..., multimodal=)`) keep the
  runner generic: it slices the plan per step and injects the rows it is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn

from qwenstack.config import ModelArgs
from qwenstack.errors import ConfigError, RequestError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec, lm_logits, output_head
from qwenstack.models.layers import RotaryEmbedding, SwiGLU
from qwenstack.models.moe import Experts, SparseMoE
from qwenstack.models.qwen3 import Qwen3Args, Qwen3Model
from qwenstack.models.qwen3_moe import Qwen3MoeArgs
from qwenstack.models.qwen3_vl_vision import Qwen3VLVisionModel, VisionArgs
from qwenstack.multimodal.inputs import (
    EncodedImage, ImageInput, ImagePlacement, MultimodalBatch, MultimodalPlan,
)

if TYPE_CHECKING:
    from qwenstack.weights import Source


class _MropeValidation:
    """Checks shared by the dense and MoE text args: M-RoPE needs its section split, read from config.json."""

    def check_mrope(self: Any, config: dict[str, Any]) -> None:
        section = self.rope.mrope_section
        if section is None or len(section) != 3:
            raise ConfigError(
                f"{self.model_type} text_config.rope_parameters needs 'mrope_section' with 3 entries "
                f"(temporal, height, width), got {section!r}"
            )
        half = self.head_dim // 2
        if sum(section) != half:
            raise ConfigError(f"mrope_section {list(section)} must sum to head_dim / 2 = {half}")
        if self.rope.rope_type != "default" or self.rope.partial_rotary_factor != 1.0:
            raise ConfigError(f"{self.model_type} supports only the default full-width rotary under M-RoPE")


@dataclass(kw_only=True)
class Qwen3VLTextArgs(_MropeValidation, Qwen3Args):
    model_type: ClassVar[str] = "qwen3_vl"

    def validate(self, config: dict[str, Any]) -> None:
        super().validate(config)
        self.check_mrope(config)


@dataclass(kw_only=True)
class Qwen3VLMoeTextArgs(_MropeValidation, Qwen3MoeArgs):
    model_type: ClassVar[str] = "qwen3_vl_moe"
    norm_topk_prob: bool = True  # not a Qwen3-VL-MoE field: the model always renormalises

    def validate(self, config: dict[str, Any]) -> None:
        super().validate(config)
        self.norm_topk_prob = True
        self.check_mrope(config)


@dataclass(kw_only=True)
class Qwen3VLArgs(ModelArgs):
    """The whole config.json: text and vision sub-configs plus the token ids the model reacts to."""

    model_type: ClassVar[str] = "qwen3_vl"
    text_args_class: ClassVar[type[Qwen3Args]] = Qwen3VLTextArgs
    derived_fields: ClassVar[tuple[str, ...]] = ("text", "vision")
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    video_token_id: int | None = None
    tie_word_embeddings: bool = False
    text_config: dict[str, Any] = field(default_factory=dict)
    vision_config: dict[str, Any] = field(default_factory=dict)
    text: Qwen3Args = field(init=False)
    vision: VisionArgs = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        if not self.text_config or not self.vision_config:
            raise ConfigError(f"config.json for {self.model_type} needs both 'text_config' and 'vision_config'")
        # Tying is the top-level field's in transformers; a config that sets it only under text_config
        # (some conversions do) is read from there.
        if "tie_word_embeddings" not in config and "tie_word_embeddings" in self.text_config:
            self.tie_word_embeddings = bool(self.text_config["tie_word_embeddings"])
        text = {**self.text_config, "tie_word_embeddings": self.tie_word_embeddings}
        self.text = self.text_args_class.from_dict(text)
        self.vision = VisionArgs.from_dict(self.vision_config)
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size ({self.vision.out_hidden_size}) must equal the text hidden_size "
                f"({self.text.hidden_size}): image embeddings replace token embeddings"
            )
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            raise ConfigError("more DeepStack features than text decoder layers to add them to")

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


@dataclass(kw_only=True)
class Qwen3VLMoeArgs(Qwen3VLArgs):
    model_type: ClassVar[str] = "qwen3_vl_moe"
    text_args_class: ClassVar[type[Qwen3Args]] = Qwen3VLMoeTextArgs


class MRotaryEmbedding(RotaryEmbedding):
    """Interleaved multimodal rotary: positions [3, T] (or [T] for text, where the three streams agree)."""

    def __init__(self, rope: Any, head_dim: int) -> None:
        super().__init__(rope, head_dim)
        self.mrope_section = tuple(rope.mrope_section)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype)
        last = self._last
        if last is not None and last[0] is positions and last[1] == dtype:
            return last[2], last[3]
        inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq  # [3, T, rotary_dim / 2]
        mixed = freqs[0].clone()
        for axis in (1, 2):  # height, width
            picked = slice(axis, 3 * self.mrope_section[axis], 3)
            mixed[:, picked] = freqs[axis][:, picked]
        emb = torch.cat((mixed, mixed), dim=-1)
        cos, sin = (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
        self._last = (positions, dtype, cos, sin)
        return cos, sin


class Qwen3VLTextModel(Qwen3Model):
    """The Qwen3 decoder (embed_tokens, layers, norm) with M-RoPE and DeepStack injection."""

    def __init__(self, args: Qwen3Args, make_mlp: Any) -> None:
        super().__init__(args, make_mlp)
        assert args.head_dim is not None
        rotary = MRotaryEmbedding(args.rope, args.head_dim)  # shared by all layers, like the plain one
        for layer in self.layers:
            layer.self_attn.rotary = rotary

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor] | None,
        inputs_embeds: torch.Tensor | None = None,
        multimodal: MultimodalBatch | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if multimodal is not None:
            x = x.index_copy(0, multimodal.rows, multimodal.embeds.to(x.dtype))
        num_deepstack = 0 if multimodal is None else multimodal.deepstack.shape[0]
        if num_deepstack == 0:  # text and decode steps: the plain stack (a native loop where prepared)
            return self.norm(self.run_layers(self.layers, x, positions, batch, kv_caches))
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, batch, None if kv_caches is None else kv_caches[i])
            if i < num_deepstack:
                assert multimodal is not None
                x = x.index_add(0, multimodal.rows, multimodal.deepstack[i].to(x.dtype))
        return self.norm(x)


class TransposedFusedExperts(Experts):
    """Experts of Qwen3-VL-MoE checkpoints: fused, in transformers' save layout or the published transposed one."""

    def checkpoint_sources(self, prefix: str) -> dict[str, list[list["Source"]]]:
        from qwenstack.weights import Source

        # The first layout is also what save_checkpoint writes: transformers 5.24's own, so it can read it back.
        return {
            f"{prefix}{name}": [[Source(f"{prefix}{name}")], [Source(f"{prefix}{name}", (), transpose=True)]]
            for name in ("gate_up_proj", "down_proj")
        }


class Qwen3VLModel(nn.Module):
    def __init__(self, args: Qwen3VLArgs, make_mlp: Any) -> None:
        super().__init__()
        self.visual = Qwen3VLVisionModel(args.vision)
        self.language_model = Qwen3VLTextModel(args.text, make_mlp)


def encode_with_vision_tower(visual: nn.Module, images: Sequence[ImageInput], merge_size: int) -> list[EncodedImage]:
    """Runs a Qwen3-VL vision tower once over several images; per image, embeddings [n, H] and DeepStack
    [k, n, H] (Qwen3-VL and Qwen3-Omni's Thinker share the tower)."""
    weight = visual.patch_embed.proj.weight
    pixel_values = torch.cat([im.pixel_values for im in images]).to(weight.device, weight.dtype)
    grid = torch.tensor([im.grid_thw for im in images], dtype=torch.long)
    embeds, deepstack = visual(pixel_values, grid)
    sizes = [im.num_tokens(merge_size) for im in images]
    stacked = torch.stack(deepstack) if deepstack else embeds.new_zeros(0, embeds.shape[0], embeds.shape[1])
    return [EncodedImage(e, d) for e, d in zip(embeds.split(sizes), stacked.split(sizes, dim=1))]


class Qwen3VLForConditionalGeneration(nn.Module):
    args_class: ClassVar[type[Qwen3VLArgs]] = Qwen3VLArgs

    def __init__(self, args: Qwen3VLArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Qwen3VLModel(args, self.make_mlp)
        self.lm_head, self.ignored_checkpoint_patterns = output_head(args.text.hidden_size, args.text.vocab_size,
                                                                    args.tie_word_embeddings)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return SwiGLU(self.args.text.hidden_size, self.args.text.intermediate_size)

    # --- CausalLM -----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,  # [T] for text only, or [3, T]
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor] | None,
        multimodal: MultimodalBatch | None = None,
    ) -> torch.Tensor:
        return self.model.language_model(input_ids, positions, batch, kv_caches, multimodal=multimodal)

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(hidden, self.lm_head, self.model.language_model.embed_tokens, token_ids)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec.of_decoder(self.args.text)

    # --- multimodal hooks (the engine's MultimodalModel protocol) ---------------------------------------

    @property
    def merge_size(self) -> int:
        return self.args.vision.spatial_merge_size

    def plan_multimodal(self, prompt_token_ids: Sequence[int], images: Sequence[ImageInput]) -> MultimodalPlan:
        """Places each image on its run of image placeholders and computes the prompt's 3-D positions.

        A video comes as one ImageInput per temporal group (video_frame set), each on its own run of video
        placeholders (the prompt's timestamps separate them), positioned as an image (get_rope_index splits the
        video grid into T=1 groups). Raises RequestError when placeholders and inputs disagree.
        """
        a = self.args
        # Images and video frame groups, in prompt order, each on its own run of placeholder tokens.
        runs = sorted([(o, n, False) for o, n in _token_runs(prompt_token_ids, a.image_token_id)]
                      + ([(o, n, True) for o, n in _token_runs(prompt_token_ids, a.video_token_id)]
                         if a.video_token_id is not None else []))
        if len(runs) != len(images):
            raise RequestError(
                f"the prompt has {len(runs)} image placeholder run(s) (video frame groups included) but "
                f"{len(images)} image(s) or video frame group(s) were given"
            )
        placements = []
        for i, ((offset, length, is_video), image) in enumerate(zip(runs, images)):
            if is_video != (image.video_frame is not None):
                kind = "a video frame group" if is_video else "an image"
                raise RequestError(f"placeholder run {i} is for {kind}, but input {i} is not")
            t, h, w = image.grid_thw
            if h % self.merge_size or w % self.merge_size:
                raise RequestError(f"image {i}: grid {image.grid_thw} is not a multiple of the merge size {self.merge_size}")
            expected = image.num_tokens(self.merge_size)
            if length != expected:
                raise RequestError(f"image {i} needs {expected} placeholder tokens, the prompt has {length}")
            placements.append(ImagePlacement(offset, length, image))
        positions, delta = self.rope_positions(len(prompt_token_ids), placements)
        return MultimodalPlan(placements, positions, delta)

    def rope_positions(self, prompt_len: int, placements: Sequence[ImagePlacement]) -> tuple[torch.Tensor, int]:
        """[3, prompt_len] M-RoPE positions and the rope delta of the generated tokens (get_rope_index)."""
        m = self.merge_size
        parts: list[torch.Tensor] = []
        index, position = 0, 0  # next prompt index, next free position
        for p in placements:
            if p.offset > index:
                text = torch.arange(p.offset - index, dtype=torch.long) + position
                parts.append(text.expand(3, -1))
                position += p.offset - index
            t, h, w = p.image.grid_thw
            gt, gh, gw = t, h // m, w // m
            tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
            parts.append(torch.stack((tt, hh, ww)).reshape(3, -1) + position)
            position += max(gh, gw)  # transformers advances by the larger side only (t is 1 for an image)
            index = p.end
        return text_tail_positions(parts, index, position, prompt_len)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> list[EncodedImage]:
        """Runs the vision tower once over several images; per image, embeddings [n, H] and DeepStack [k, n, H]."""
        return encode_with_vision_tower(self.model.visual, images, self.merge_size)


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    args_class = Qwen3VLMoeArgs

    def make_mlp(self, layer_idx: int) -> nn.Module:
        a = self.args.text
        assert isinstance(a, Qwen3MoeArgs)
        if not a.is_sparse_layer(layer_idx):
            return SwiGLU(a.hidden_size, a.intermediate_size)
        moe = SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.num_experts_per_tok, True)
        moe.experts = TransposedFusedExperts(a.num_experts, a.hidden_size, a.moe_intermediate_size)
        return moe


def text_tail_positions(parts: list[torch.Tensor], index: int, position: int,
                        prompt_len: int) -> tuple[torch.Tensor, int]:
    """The M-RoPE planners' last step: text from prompt index `index` at running `position` to the prompt's
    end after `parts`; returns the positions [3, prompt_len] and the rope delta of generated tokens."""
    if prompt_len > index:
        parts.append((torch.arange(prompt_len - index, dtype=torch.long) + position).expand(3, -1))
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - prompt_len if prompt_len else 0
    return positions.contiguous(), delta


def _token_runs(token_ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """(offset, length) of each maximal run of `token`."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate(token_ids):
        if t == token:
            if start is None:
                start = i
        elif start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, len(token_ids) - start))
    return runs


__all__ = [
    "MRotaryEmbedding", "Qwen3VLArgs", "Qwen3VLForConditionalGeneration", "Qwen3VLMoeArgs",
    "Qwen3VLMoeForConditionalGeneration",
]
