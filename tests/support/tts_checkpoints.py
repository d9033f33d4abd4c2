"""Tiny random Qwen3-TTS checkpoints rebuilt from a recipe (config + tensor names and shapes + seed).

The reference outputs in tests/fixtures/tts/ were written by the official `qwen-tts` package from exactly
these weights (scripts/tts_reference/make_fixtures.py runs this same recipe in its own environment). The
weights themselves are not committed: every tensor is a deterministic function of the seed and its name, so
a test rebuilds the checkpoint and checks its hash against the one the fixtures recorded.

Pure torch + safetensors, no qwenstack import: the reference environment imports this file too.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tts"
KINDS = ("custom_voice", "voice_design", "base")

# Codec sizes of the tiny build (shared/reference/speech-and-images.md §1.3): 4 code groups of 64 codes; the
# talker vocabulary adds the 1024 ids of specials, languages and speakers that generate() suppresses.
CODEBOOK, GROUPS = 64, 4
TALKER_VOCAB = CODEBOOK + 1024
TEXT_VOCAB = 1024
TTS_PAD, TTS_BOS, TTS_EOS = 1000, 1001, 1002


def talker_config(kind: str) -> dict[str, Any]:
    """The Qwen3TTSConfig kwargs of one model kind (CustomVoice, VoiceDesign or Base)."""
    speakers = {"custom_voice": {"vivian": 1010, "eric": 1011}, "voice_design": {}, "base": {}}[kind]
    dialects = {name: ("sichuan_dialect" if name == "eric" else False) for name in speakers}
    config: dict[str, Any] = dict(
        talker_config=dict(
            vocab_size=TALKER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, text_hidden_size=24,
            text_vocab_size=TEXT_VOCAB, num_code_groups=GROUPS, max_position_embeddings=512, rms_norm_eps=1e-6,
            rope_scaling=dict(rope_type="default", mrope_section=[2, 3, 3], interleaved=True),
            spk_id=speakers, spk_is_dialect=dialects,
            codec_language_id={"english": 1020, "chinese": 1021, "sichuan_dialect": 1022},
            code_predictor_config=dict(
                vocab_size=CODEBOOK, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=12, num_code_groups=GROUPS,
                max_position_embeddings=64, layer_types=["full_attention"] * 2, rms_norm_eps=1e-6),
            codec_pad_id=1000, codec_bos_id=1001, codec_eos_token_id=1002, codec_think_id=1003,
            codec_nothink_id=1004, codec_think_bos_id=1005, codec_think_eos_id=1006),
        speaker_encoder_config=dict(mel_dim=128, enc_dim=32, enc_channels=[16, 16, 16, 16, 48],
                                    enc_attention_channels=8, enc_se_channels=8, enc_res2net_scale=2),
        tts_model_type=kind, tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_size="tiny",
        tts_pad_token_id=TTS_PAD, tts_bos_token_id=TTS_BOS, tts_eos_token_id=TTS_EOS,
        im_start_token_id=1003, im_end_token_id=1004,
    )
    return config


def tokenizer_config() -> dict[str, Any]:
    """The Qwen3TTSTokenizerV2Config kwargs of the tiny 12 Hz codec (sliding window 8 in the decoder)."""
    return dict(
        encoder_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
            intermediate_size=64, codebook_size=CODEBOOK, codebook_dim=16, num_filters=4, num_residual_layers=1,
            upsampling_ratios=[8, 6, 5, 4], num_quantizers=GROUPS, num_semantic_quantizers=1, frame_rate=12.5,
            sampling_rate=24000, sliding_window=16, use_streaming=False, upsample_groups=32,
            vector_quantization_hidden_dimension=16),
        decoder_config=dict(
            codebook_size=CODEBOOK, codebook_dim=16, hidden_size=32, latent_dim=32, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2, num_quantizers=GROUPS,
            sliding_window=8, upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], decoder_dim=32, head_dim=16),
        encoder_valid_num_quantizers=GROUPS,
    )


def recipe_tensor(name: str, shape: list[int], dtype: str, seed: int) -> torch.Tensor:
    """The value of one checkpoint tensor: a function of the seed and its name only.

    Default init of the reference leaves the codec decoder silent (SnakeBeta at 0, LayerScale at 0.01,
    tiny convolutions), so every float tensor is drawn afresh: norms and codebook usage near 1, the rest
    N(0, scale) with a scale that keeps activations in range."""
    torch_dtype = getattr(torch, dtype)
    if not torch_dtype.is_floating_point:
        return torch.ones(shape, dtype=torch_dtype)  # Mimi's `initialized` flags
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "cluster_usage":
        return (1.0 + 0.1 * noise.abs()).to(torch_dtype)
    if ("norm" in name or leaf == "scale") and len(shape) == 1 and leaf in ("weight", "scale"):
        return (1.0 + 0.1 * noise).to(torch_dtype)
    if leaf in ("alpha", "beta"):
        return (0.1 * noise).to(torch_dtype)
    if leaf == "bias":
        return (0.02 * noise).to(torch_dtype)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    scale = 0.5 if len(shape) == 1 else min(0.5, 1.0 / max(fan_in, 1) ** 0.5)
    if "embed" in name or "codebook" in name:
        scale = 0.5
    if name.startswith("decoder.decoder.") and leaf == "weight" and shape[0] == 1:
        scale = 0.004  # the codec's last conv: keeps the waveform inside the final clamp(-1, 1)
    return (scale * noise).to(torch_dtype)


def recipe_state(manifest: list[list[Any]], seed: int) -> dict[str, torch.Tensor]:
    """manifest: [name, shape, dtype] per tensor."""
    return {name: recipe_tensor(name, shape, dtype, seed) for name, shape, dtype in manifest}


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        digest.update(name.encode())
        digest.update(str(list(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_recipe(kind: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{kind}_recipe.json").read_text())


def build_checkpoint(kind: str, out_dir: Path) -> dict[str, str]:
    """Writes the checkpoint of one kind in the published layout (config.json, model.safetensors,
    speech_tokenizer/{config.json, model.safetensors}); returns the hashes of the two weight sets."""
    from safetensors.torch import save_file

    recipe = load_recipe(kind)
    hashes = {}
    for part, sub in (("model", out_dir), ("speech_tokenizer", out_dir / "speech_tokenizer")):
        sub.mkdir(parents=True, exist_ok=True)
        state = recipe_state(recipe[part]["manifest"], recipe[part]["seed"])
        hashes[part] = state_hash(state)
        (sub / "config.json").write_text(json.dumps(recipe[part]["config"], indent=2))
        save_file(state, str(sub / "model.safetensors"), metadata={"format": "pt"})
    return hashes


def reference_clip(seconds: float = 1.0, sample_rate: int = 24000) -> "Any":
    """A deterministic test signal (a chirp with harmonics and a tremolo), float32 numpy in [-0.6, 0.6]."""
    import numpy as np

    t = np.arange(int(seconds * sample_rate), dtype=np.float64) / sample_rate
    phase = 2 * np.pi * (180.0 * t + 120.0 * t * t)
    wave = 0.35 * np.sin(phase) + 0.15 * np.sin(2 * phase + 0.3) + 0.08 * np.sin(5 * phase + 1.1)
    wave *= 0.75 + 0.25 * np.sin(2 * np.pi * 3.0 * t)
    return wave.astype(np.float32)
