"""Log-mel features for Qwen3-ASR's audio encoder, computed in torch (Whisper-style, 128 bins).

Equal to transformers' `Qwen3ASRFeatureExtractor` on one clip (what its processor does per request with
`padding=True`), and to the `WhisperFeatureExtractor` Qwen3-Omni's processor uses: clips shorter than
`min_length` are zero-padded first (Qwen3-ASR's extractor only: 0.5 s; Whisper's pads nothing); a centred
STFT with a periodic Hann window (n_fft 400, hop 160) whose last frame is dropped; power spectrum through
Slaney-normalised mel filters (0-8 kHz, Slaney mel scale); log10 clamped at 1e-10; floored at the clip's
maximum minus 8; then (x + 4) / 4. Every frame of a single clip is valid, so the mask is all ones; the
encoder pads to whole 100-frame chunks itself (with zeros, as the extractor does).

The filter bank is computed in float64 and used in float32, as transformers does, so the two agree to
float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from qwenstack.audio.decode import SAMPLE_RATE
from qwenstack.config import read_processor_config


@dataclass(frozen=True)
class MelSettings:
    """The extractor's preprocessor_config.json fields that change the features."""

    feature_size: int = 128
    sampling_rate: int = SAMPLE_RATE
    n_fft: int = 400
    hop_length: int = 160
    min_length: int = 8000  # samples: shorter clips are zero-padded (0.5 s)

    @classmethod
    def from_config(cls, config: dict) -> "MelSettings":
        fields = {k: int(config[k]) for k in ("feature_size", "sampling_rate", "n_fft", "hop_length", "min_length")
                  if config.get(k) is not None}
        # Qwen3-Omni's checkpoints name WhisperFeatureExtractor, which has no min_length and never pads a short
        # clip: the 0.5 s default is Qwen3ASRFeatureExtractor's own.
        if config.get("feature_extractor_type") == "WhisperFeatureExtractor":
            fields.setdefault("min_length", 0)
        return cls(**fields)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "MelSettings":
        """A checkpoint's extractor settings: processor_config.json's feature_extractor (where transformers 5's
        processor.save_pretrained writes them), else preprocessor_config.json, else the defaults."""
        return cls.from_config(read_processor_config(model_dir, "feature_extractor", "preprocessor_config.json",
                                                     required=False))

    @property
    def min_samples(self) -> int:
        """The padded length: min_length, and at least one frame past the STFT's reflect padding (n_fft // 2),
        which transformers' extractors cannot compute on a shorter clip (they raise)."""
        return max(self.min_length, self.n_fft // 2 + 1)


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    mel = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    logstep = 27.0 / np.log(6.4)
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * logstep, mel)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    freq = 200.0 * mel / 3.0
    logstep = np.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(logstep * (mel - 15.0)), freq)


@lru_cache(maxsize=8)
def mel_filters(num_mel: int, n_fft: int, sampling_rate: int, f_max: float = 8000.0) -> torch.Tensor:
    """[n_fft // 2 + 1, num_mel] Slaney-scale, Slaney-normalised triangular filters (float32)."""
    fft_freqs = np.linspace(0, sampling_rate // 2, 1 + n_fft // 2)
    mel_points = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(f_max), num_mel + 2)
    filter_freqs = _mel_to_hz_slaney(mel_points)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (filter_freqs[2:num_mel + 2] - filter_freqs[:num_mel])  # equal area per filter
    return torch.from_numpy(filters).to(torch.float32)


def log_mel(samples: np.ndarray | torch.Tensor, settings: MelSettings = MelSettings()) -> torch.Tensor:
    """[feature_size, frames] float32 log-mel features of one mono clip at settings.sampling_rate."""
    wave = torch.as_tensor(np.asarray(samples, dtype=np.float32) if not isinstance(samples, torch.Tensor) else samples,
                           dtype=torch.float32).flatten()
    if wave.numel() < settings.min_samples:
        wave = torch.nn.functional.pad(wave, (0, settings.min_samples - wave.numel()))
    window = torch.hann_window(settings.n_fft)
    stft = torch.stft(wave, settings.n_fft, settings.hop_length, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = mel_filters(settings.feature_size, settings.n_fft, settings.sampling_rate)
    mel = filters.T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def num_frames(num_samples: int, settings: MelSettings = MelSettings()) -> int:
    """Feature frames of a clip of `num_samples` samples (after the short-clip padding)."""
    return max(num_samples, settings.min_samples) // settings.hop_length


__all__ = ["MelSettings", "log_mel", "mel_filters", "num_frames"]
