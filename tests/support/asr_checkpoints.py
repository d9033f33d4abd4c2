"""Tiny random Qwen3-ASR checkpoints in transformers' layout and in the original `thinker.*` layout, a
tokenizer with Qwen's audio token ids, and test audio made at test time (numpy tones and noise, espeak-ng
speech, sox-made files)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vl_checkpoints import FIRST_ADDED_ID, QWEN_ADDED, VOCAB, _randomise

AUDIO_TOKEN_ID, AUDIO_START_ID, AUDIO_END_ID = 151676, 151669, 151670
ASR_TEXT_TOKEN = "<asr_text>"

AUDIO_CONFIG: dict[str, Any] = {
    "num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "d_model": 32,
    "output_dim": 64, "downsample_hidden_size": 16, "n_window": 50,
    # 2 s windows (26 positions) instead of the released 8 s, so a 6 s clip already spans several windows
    "n_window_infer": 200,
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "Qwen3ASRFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
    "hop_length": 160, "n_fft": 400, "chunk_length": 30, "n_window": 50, "min_length": 8000,
    "padding_value": 0.0, "dither": 0.0, "return_attention_mask": True,
}


def hf_config(tie: bool = True, audio: dict | None = None, text: dict | None = None) -> Any:
    import transformers

    return transformers.Qwen3ASRConfig(audio_config={**AUDIO_CONFIG, **(audio or {})},
                                       text_config={**TEXT_CONFIG, **(text or {}), "tie_word_embeddings": tie},
                                       tie_word_embeddings=tie)


def build_asr_checkpoint(out_dir: Path, tie: bool = True, seed: int = 0, layout: str = "hf",
                         with_tokenizer: bool = True, audio: dict | None = None, text: dict | None = None) -> Path:
    """A random Qwen3-ASR saved by transformers; layout "thinker" rewrites it as the original checkpoints are."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ASRForConditionalGeneration(hf_config(tie, audio, text)).eval()
    _randomise(model, seed)
    if tie:
        model.tie_weights()
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    if layout == "thinker":
        to_thinker_layout(out_dir)
    if with_tokenizer:
        write_asr_tokenizer(out_dir)
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    return out_dir


def to_thinker_layout(model_dir: Path) -> None:
    """Rewrites a transformers-layout checkpoint in the original layout (thinker_config, thinker.* keys)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    thinker = {"audio_config": config.pop("audio_config"), "text_config": config.pop("text_config"),
               "audio_token_id": config.pop("audio_token_id"), "audio_start_token_id": AUDIO_START_ID}
    config["thinker_config"] = thinker
    config["architectures"] = ["Qwen3ASRForConditionalGeneration"]
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(str(model_dir / "model.safetensors"))
    renamed = {}
    for name, tensor in state.items():
        for old, new in (("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
                         ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
                         ("model.audio_tower.", "thinker.audio_tower."),
                         ("model.language_model.", "thinker.model."), ("lm_head.", "thinker.lm_head.")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = tensor
    save_file(renamed, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def load_hf_asr(model_dir: Path) -> Any:
    import transformers

    return transformers.Qwen3ASRForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_features(samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' features of one clip as its processor makes them: (input_features [1, 128, F'], mask [1, F'])."""
    from transformers import Qwen3ASRFeatureExtractor

    out = Qwen3ASRFeatureExtractor()(samples, sampling_rate=16000, padding=True, return_attention_mask=True,
                                     return_tensors="pt")
    return out["input_features"], out["attention_mask"]


# --- a tokenizer with Qwen3-ASR's special-token ids -------------------------------------------------------

# After Qwen3's added tokens (151643..151668): the Omni/ASR audio and vision extras, up to <asr_text>.
ASR_EXTRA = [("<|audio_start|>", True), ("<|audio_end|>", True), ("<tts_pad>", True), ("<tts_text_bos>", True),
             ("<tts_text_eod>", True), ("<tts_text_bos_single>", True), ("<|audio_unused_151675|>", True),
             ("<|audio_pad|>", True)]


@lru_cache(maxsize=1)
def asr_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer

    from vl_checkpoints import vl_tokenizer_json

    tok = Tokenizer.from_str(vl_tokenizer_json())
    assert tok.get_vocab_size() == FIRST_ADDED_ID + len(QWEN_ADDED)
    for content, special in ASR_EXTRA:
        tok.add_special_tokens([AddedToken(content, special=special, normalized=False)])
    assert tok.token_to_id("<|audio_start|>") == AUDIO_START_ID and tok.token_to_id("<|audio_pad|>") == AUDIO_TOKEN_ID
    # <asr_text> is an ordinary added token in the released vocabulary (not special: it stays in the output)
    tok.add_tokens([AddedToken(ASR_TEXT_TOKEN, special=False, normalized=False)])
    return tok.to_str()


def write_asr_tokenizer(out_dir: Path) -> None:
    from tokenizer_training import default_chat_template

    (out_dir / "tokenizer.json").write_text(asr_tokenizer_json())
    config = {"tokenizer_class": "Qwen2TokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768,
              "chat_template": default_chat_template()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# --- test audio ----------------------------------------------------------------------------------------------


def tone(seconds: float, freq: float = 440.0, rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Noise bursts with pauses over a gliding tone: varied features without a speech synthesiser."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    glide = 0.3 * np.sin(2 * np.pi * (200 + 150 * np.sin(2 * np.pi * 0.3 * t)) * t)
    envelope = (np.sin(2 * np.pi * 1.7 * t + rng.uniform(0, 6)) > -0.3).astype(np.float32)
    return ((glide + 0.2 * rng.standard_normal(n)) * envelope).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def espeak_wav(text: str, out: Path) -> Path | None:
    """Speech by espeak-ng (None where it is not installed)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    subprocess.run([exe, "-w", str(out), text], check=True, capture_output=True)
    return out


# --- a scripted Qwen3-ASR: whatever the audio, greedy decoding writes a chosen answer ------------------------


def build_scripted_asr(out_dir: Path, answer: str = "language English<asr_text>hello there, this is a test.",
                       seed: int = 0) -> Path:
    """tests/scripted.py's Qwen3 decoder (greedy output fixed by the last two tokens) under a random audio
    encoder, with Qwen3-ASR's three audio tokens added to its tokenizer. The prompt's audio rows sit far from
    its end, so every clip gets `answer`, and a prefix cut from the answer's own tokens continues it."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer as RustTokenizer

    from qwenstack.models.qwen3_asr_audio import AudioEncoder, AudioEncoderArgs, AudioProjector
    from scripted import build_scripted_checkpoint

    out_dir = Path(out_dir)
    lm = build_scripted_checkpoint(out_dir, answer)
    tok = RustTokenizer.from_file(str(out_dir / "tokenizer.json"))
    first = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|audio_start|>", "<|audio_pad|>", "<|audio_end|>")])
    tok.save(str(out_dir / "tokenizer.json"))
    text = json.loads((out_dir / "config.json").read_text())
    hidden, vocab = text["hidden_size"], first + 3
    state = {}
    for name, tensor in load_file(str(out_dir / "model.safetensors")).items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = torch.zeros(3, tensor.shape[1])
            if name == "model.embed_tokens.weight":
                extra[:, :2] = 1  # the constant and the "any other token" features, like unscripted tokens
            tensor = torch.cat([tensor, extra])
        state[name if name == "lm_head.weight" else "model.language_model." + name[len("model."):]] = tensor
    audio = {**AUDIO_CONFIG, "output_dim": hidden}
    torch.manual_seed(seed)
    args = AudioEncoderArgs.from_dict(audio)
    for prefix, module in (("model.audio_tower.", AudioEncoder(args)), ("model.multi_modal_projector.",
                                                                        AudioProjector(args))):
        state.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "qwen3_asr", "architectures": ["Qwen3ASRForConditionalGeneration"],
              "audio_config": audio, "text_config": {**text, "vocab_size": vocab}, "audio_token_id": first + 1,
              "tie_word_embeddings": False, "eos_token_id": text["eos_token_id"]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    assert lm.script == answer
    return out_dir
