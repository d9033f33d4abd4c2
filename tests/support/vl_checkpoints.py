"""Tiny random Qwen3-VL and Qwen3-VL-MoE checkpoints in the published layout, saved by transformers, with a
preprocessor config and a test tokenizer whose vision tokens have Qwen's real ids."""
from __future__ import annotations

import base64
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151655, 151656
VISION_START_ID, VISION_END_ID = 151652, 151653
VOCAB = 151936  # the special ids are hard-wired, so the text vocab must be the real one

VISION_CONFIG: dict[str, Any] = {
    "depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "patch_size": 16,
    "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64, "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0, 2], "in_channels": 3, "hidden_act": "gelu_pytorch_tanh",
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    # 8 frequencies: T,H,W interleaved over the first 6, T for the last 2 (sections sum to head_dim / 2)
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                        "mrope_interleaved": True},
}
# 48 != 64 and 2 * 48 != 64: the fused expert layouts are told apart by shape
MOE_TEXT = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "decoder_sparse_step": 1,
            "mlp_only_layers": [1]}
PREPROCESSOR_CONFIG = {
    "size": {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 24},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}


def hf_config(kind: str, tie: bool) -> Any:
    import transformers

    if kind == "dense":
        return transformers.Qwen3VLConfig(vision_config=dict(VISION_CONFIG), text_config=dict(TEXT_CONFIG),
                                          tie_word_embeddings=tie)
    return transformers.Qwen3VLMoeConfig(vision_config=dict(VISION_CONFIG), text_config={**TEXT_CONFIG, **MOE_TEXT},
                                         tie_word_embeddings=tie)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # transformers' init (0.02-std weights, unit norms, zero biases) gives tiny activations, which would make a
    # 1e-4 tolerance meaningless: give every parameter an O(1)-scale random value instead.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif name.endswith("pos_embed.weight"):
                p.copy_(noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(0.3 * noise)  # also the tied lm_head: logits of a few units, not tens
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(noise / p.shape[-1] ** 0.5)  # in-memory [E, out, in]
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def build_vl_checkpoint(out_dir: Path, kind: str = "dense", tie: bool = True, seed: int = 0,
                        with_tokenizer: bool = False) -> Path:
    import transformers

    cls = transformers.Qwen3VLForConditionalGeneration if kind == "dense" else transformers.Qwen3VLMoeForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(hf_config(kind, tie)).eval()
    _randomise(model, seed)
    if tie:
        model.tie_weights()
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if with_tokenizer:
        write_vl_tokenizer(out_dir)
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    return out_dir


def load_hf_vl(model_dir: Path) -> Any:
    import transformers

    config = json.loads((model_dir / "config.json").read_text())
    cls = (transformers.Qwen3VLForConditionalGeneration if config["model_type"] == "qwen3_vl"
           else transformers.Qwen3VLMoeForConditionalGeneration)
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


# --- a tokenizer with Qwen's special-token ids ------------------------------------------------------------

# Qwen2/3's added tokens from id 151643 on, in order (tokenizer.json of the released checkpoints).
QWEN_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
FIRST_ADDED_ID = 151643


@lru_cache(maxsize=1)
def vl_tokenizer_json() -> str:
    """The tiny test BPE, padded with unreachable filler tokens so the added tokens land on Qwen's ids."""
    from tokenizers import AddedToken, Tokenizer

    from checkpoints import tiny_tokenizer

    data = json.loads(tiny_tokenizer().to_str())
    data["added_tokens"] = []
    vocab: dict[str, int] = data["model"]["vocab"]
    specials = {content for content, _ in QWEN_ADDED}
    for token in [t for t in vocab if t in specials]:  # the BPE's own copies of <|endoftext|> etc.
        token_id = vocab.pop(token)
        vocab[f"<|unused_{token_id}|>"] = token_id
    used = set(vocab.values())
    for i in range(FIRST_ADDED_ID):
        if i not in used:
            vocab[f"<|unused_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    for content, special in QWEN_ADDED:
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    assert tok.token_to_id("<|image_pad|>") == IMAGE_TOKEN_ID and tok.token_to_id("</think>") == 151668
    return tok.to_str()


def write_vl_tokenizer(out_dir: Path) -> None:
    from tokenizer_training import default_chat_template

    (out_dir / "tokenizer.json").write_text(vl_tokenizer_json())
    config = {"tokenizer_class": "Qwen2TokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768,
              "chat_template": default_chat_template()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# --- images --------------------------------------------------------------------------------------------


def noise_image(width: int, height: int, seed: int = 0) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_prompt(text_ids: list[list[int]], image_tokens: list[int]) -> list[int]:
    """Text pieces around images: piece0 <vs><pad>*n0<ve> piece1 ... (len(text_ids) == len(images) + 1)."""
    ids = list(text_ids[0])
    for n, piece in zip(image_tokens, text_ids[1:]):
        ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * n + [VISION_END_ID] + list(piece)
    return ids
