"""Tiny random Qwen-Image pipelines in the diffusers layout, built offline at test time.

The real checkpoints (Qwen/Qwen-Image-Edit-2509, Qwen/Qwen-Image-Edit, Qwen/Qwen-Image) are directories
with model_index.json and one folder per component; these are the same layout with components a few
kilobytes big (the shapes diffusers' own fast tests use). The tokenizer and the processor are built here
rather than downloaded: byte-level tokens plus the Qwen special tokens, no merges.

`small_condition_sizes` shrinks the areas the Edit pipelines resize their inputs to (1024x1024 for the VAE,
384x384 for the vision encoder): at full size the VAE encoder alone takes over 20 s on two cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CLASS_NAMES = {"edit_plus": "QwenImageEditPlusPipeline", "edit": "QwenImageEditPipeline",
               "generate": "QwenImagePipeline"}
SMALL_AREA = 64 * 64  # what the tests let the Edit pipelines resize condition images to


def _tokenizer():
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(bytes_to_unicode().values())}
    vocab.update({s: len(vocab) + k for k, s in enumerate(SPECIAL_TOKENS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tok


def _components(tok) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text_config = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, rope_theta=1e6, vocab_size=len(tok),
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default", type="default"))
    vision_config = dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, hidden_size=16, vocab_size=len(tok),
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"])).eval()
    return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(),
            "text_encoder": text_encoder, "tokenizer": tok}


def build_image_pipelines(root: Path) -> dict[str, Path]:
    """Writes the three tiny pipelines (same weights) under `root`; returns {kind: directory}."""
    from transformers import Qwen2VLImageProcessorPil

    tok = _tokenizer()
    parts = _components(tok)
    out = {}
    for kind, class_name in CLASS_NAMES.items():
        directory = root / kind
        for name, component in parts.items():
            component.save_pretrained(directory / name)
        index = {"_class_name": class_name, "_diffusers_version": "0.42.1",
                 **{name: [_library(c), type(c).__name__] for name, c in parts.items()}}
        if kind != "generate":
            # The processor as Qwen publishes it: an image-processor config beside the tokenizer files.
            # (ProcessorMixin.save_pretrained needs a video processor, which needs torchvision.)
            Qwen2VLImageProcessorPil().save_pretrained(directory / "processor")
            tok.save_pretrained(directory / "processor")
            index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (directory / "model_index.json").write_text(json.dumps(index, indent=2))
        out[kind] = directory
    return out


def _library(component) -> str:
    return "transformers" if type(component).__module__.startswith("transformers") else "diffusers"


def small_condition_sizes(monkeypatch) -> None:
    """Caps the areas the Edit pipelines resize their inputs to (see the module docstring)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for module in (edit, plus):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, _f=original: _f(min(area, SMALL_AREA), ratio))
