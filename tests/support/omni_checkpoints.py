"""Tiny random Qwen3-Omni-MoE checkpoints saved by transformers 5.24 (Instruct with Talker and Code2Wav, or a
Thinking/Captioner one with `enable_audio_output: false` and only `thinker.*` weights), with a preprocessor
config and the ASR test tokenizer, whose audio, vision and tts tokens sit on Qwen's ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from asr_checkpoints import AUDIO_CONFIG, AUDIO_START_ID, AUDIO_TOKEN_ID, PREPROCESSOR_CONFIG as AUDIO_PRE
from asr_checkpoints import asr_tokenizer_json, write_asr_tokenizer
from vl_checkpoints import IMAGE_TOKEN_ID, PREPROCESSOR_CONFIG as IMAGE_PRE, VIDEO_TOKEN_ID, VISION_CONFIG, VOCAB
from vl_checkpoints import VISION_START_ID, _randomise

# Codec ids: codes 0..63 are speech, the top 1024 ids of the talker vocabulary are specials (suppressed in
# generation except EOS), as in the released layout (vocab 3072, specials from 2048 up).
TALKER_VOCAB = 1088
CODEC = {"codec_pad_id": 1060, "codec_bos_id": 1061, "codec_eos_token_id": 1062, "codec_nothink_id": 1063,
         "codec_think_bos_id": 1064, "codec_think_eos_id": 1065}
SPEAKERS = {"ethan": 1070, "chelsie": 1071}
NUM_CODE_GROUPS = 4
CODEBOOK = 64

THINKER_TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
    "mlp_only_layers": [1], "norm_topk_prob": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                        "interleaved": True},
}
TALKER_TEXT: dict[str, Any] = {
    "vocab_size": TALKER_VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40, "norm_topk_prob": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                        "interleaved": True},
}
CODE_PREDICTOR: dict[str, Any] = {
    "vocab_size": CODEBOOK, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "num_code_groups": NUM_CODE_GROUPS,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
CODE2WAV: dict[str, Any] = {
    "codebook_size": CODEBOOK, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
    "intermediate_size": 48, "num_hidden_layers": 2, "sliding_window": 8, "num_quantizers": NUM_CODE_GROUPS,
    "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2], "decoder_dim": 32, "max_position_embeddings": 8000,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
PREPROCESSOR_CONFIG = {**IMAGE_PRE, **AUDIO_PRE, "processor_class": "Qwen3OmniMoeProcessor"}


def hf_config(audio_output: bool = True, accept_hidden_layer: int = 2,
              sizes: dict[str, dict[str, Any]] | None = None) -> Any:
    """sizes: updates of the "thinker_text", "talker_text", "code_predictor" and "code2wav" sub-configs (the
    benchmark's larger shape); the widths that must follow the Thinker's hidden_size follow it."""
    import transformers

    sizes = sizes or {}
    text = {**THINKER_TEXT, **sizes.get("thinker_text", {})}
    width = text["hidden_size"]
    predictor = {**CODE_PREDICTOR, **sizes.get("code_predictor", {})}
    thinker = {"text_config": text, "vision_config": {**VISION_CONFIG, "out_hidden_size": width},
               "audio_config": {**AUDIO_CONFIG, "output_dim": width}, "audio_token_id": AUDIO_TOKEN_ID,
               "audio_start_token_id": AUDIO_START_ID, "image_token_id": IMAGE_TOKEN_ID,
               "video_token_id": VIDEO_TOKEN_ID, "vision_start_token_id": VISION_START_ID,
               "position_id_per_seconds": 25}
    talker = {"text_config": {**TALKER_TEXT, **sizes.get("talker_text", {})}, "code_predictor_config": predictor,
              "num_code_groups": predictor["num_code_groups"], "thinker_hidden_size": width,
              "accept_hidden_layer": accept_hidden_layer, "speaker_id": dict(SPEAKERS),
              "audio_token_id": AUDIO_TOKEN_ID, "image_token_id": IMAGE_TOKEN_ID, "video_token_id": VIDEO_TOKEN_ID,
              "vision_start_token_id": VISION_START_ID, "audio_start_token_id": AUDIO_START_ID,
              "spatial_merge_size": 2, **CODEC}
    code2wav = {**CODE2WAV, "num_quantizers": predictor["num_code_groups"], **sizes.get("code2wav", {})}
    return transformers.Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                                           enable_audio_output=audio_output, **ROLE_IDS)


# The tiny BPE spells "user" and "assistant" in several tokens; the Talker finds turns by single role-token
# ids (872 and 77091 in Qwen's vocabulary), so the test tokenizer adds them as whole tokens.
ROLE_IDS = {"system_token_id": 151678, "user_token_id": 151679, "assistant_token_id": 151680}


def omni_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(asr_tokenizer_json())
    for name, key in (("system", "system_token_id"), ("user", "user_token_id"), ("assistant", "assistant_token_id")):
        tok.add_tokens([AddedToken(name, normalized=False, special=False)])
        assert tok.token_to_id(name) == ROLE_IDS[key]
    return tok.to_str()


def build_omni_checkpoint(out_dir: Path, audio_output: bool = True, seed: int = 0,
                          with_tokenizer: bool = True, sizes: dict[str, dict[str, Any]] | None = None) -> Path:
    """A random Qwen3-Omni-MoE saved by transformers; audio_output=False is the Thinking/Captioner layout."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3OmniMoeForConditionalGeneration(hf_config(audio_output, sizes=sizes)).eval()
    _randomise(model, seed)
    if audio_output:
        _scale_code2wav(model.code2wav)
    model.save_pretrained(out_dir)
    _write_side_files(out_dir, with_tokenizer)
    return out_dir


def build_native_omni_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """The same random Instruct layout built with qwenstack's own modules and saved in the checkpoint layout
    (qwenstack.weights.save_checkpoint): for tests that need an Omni server, not transformers parity. It skips
    importing transformers' modeling code, 12 of the 17 s the transformers build takes on 2 shared cores
    (only its config class runs, for config.json's defaults)."""
    from qwenstack.models.qwen3_omni_moe import Qwen3OmniMoeArgs, Qwen3OmniMoeForConditionalGeneration
    from qwenstack.weights import save_checkpoint

    config = hf_config().to_dict()
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeArgs.from_dict(config)).eval()
    _randomise(model, seed)
    _scale_code2wav(model.code2wav)
    save_checkpoint(model, out_dir, {**config, "architectures": [type(model).__name__]})
    _write_side_files(out_dir, with_tokenizer=True)
    return out_dir


def _scale_code2wav(code2wav: torch.nn.Module) -> None:
    with torch.no_grad():
        # Code2Wav's layer scales start at 0.01 and its ConvNeXt gammas at 1e-6 in training; O(1) values make
        # the waveform depend on every part of the decoder, so the parity tolerance means something.
        for name, p in code2wav.named_parameters():
            if name.endswith(("layer_scale.scale", ".gamma")):
                p.fill_(0.5)
            elif name.endswith((".alpha", ".beta")):
                p.mul_(0.2)  # log-scale snake parameters
            elif name.startswith("decoder.") and name.endswith("conv.weight"):
                # Each residual stage otherwise doubles the signal: 40x before the clamp, where float32
                # reassociation (1e-6) grows to 1e-3; kept O(1), a 1e-5 tolerance checks the decoder.
                p.mul_(0.4)


def _write_side_files(out_dir: Path, with_tokenizer: bool) -> None:
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if with_tokenizer:
        write_asr_tokenizer(out_dir)
        (out_dir / "tokenizer.json").write_text(omni_tokenizer_json())
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))


def load_hf_omni(model_dir: Path) -> Any:
    import transformers

    return transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
