"""The AuT audio encoder of Qwen3-ASR (and of Qwen3-Omni's thinker), in plain PyTorch.

Decisions:
- Module and parameter names equal transformers' `model.audio_tower.*` keys (conv2d1..3, conv_out,
  layers.{i}.*, ln_post); the projector is `model.multi_modal_projector.linear_{1,2}`. The original
  `thinker.*` layout is renamed to these by the model's sanitize step, not here.
- The mel axis is cut into chunks of 2 * n_window frames (1 s). Each chunk goes through three stride-2
  3x3 convolutions on its own (zero padding at the chunk's edges), so a chunk of 100 frames gives 13
  positions; the sinusoidal position embedding restarts at 0 in every chunk. Only the positions that come
  from valid frames are kept (a clip's last chunk is partial), exactly as transformers' post-CNN lengths.
- A clip's positions then attend bidirectionally within windows of n_window_infer frames (13 * 8 = 104
  positions for the released 800), never across windows or clips (transformers' `cu_seqlens`). Windows of
  equal length run as one SDPA batch.
- Clips are encoded one batch per step: every chunk of every clip through the convolutions at once.
- Nothing is a buffer: the sinusoids are recomputed per call (13 rows), so a meta-built model has no
  unfilled state after loading.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.errors import ConfigError
from qwenstack.models.attention import window_attention

_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


@dataclass
class AudioEncoderArgs:
    """The `audio_config` object of a Qwen3-ASR config.json (either layout); fields are named as there."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    output_dim: int
    downsample_hidden_size: int
    num_mel_bins: int = 128
    n_window: int = 50
    n_window_infer: int = 800
    activation_function: str = "gelu"
    scale_embedding: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "AudioEncoderArgs":
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and config.get(f.name) is None]
        if missing:
            names = ", ".join(f"'{n}'" for n in missing)
            raise ConfigError(f"audio_config in config.json is missing {names}, required by the Qwen3-ASR audio encoder")
        known = {f.name for f in fields}
        args = cls(**{k: v for k, v in config.items() if k in known and v is not None})
        if args.activation_function not in _ACTIVATIONS:
            raise ConfigError(f"audio_config.activation_function '{args.activation_function}' is not supported")
        if args.d_model % args.encoder_attention_heads:
            raise ConfigError("audio_config.d_model must be a multiple of encoder_attention_heads")
        if args.n_window_infer % (2 * args.n_window):
            raise ConfigError("audio_config.n_window_infer must be a multiple of 2 * n_window")
        return args

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @property
    def window_positions(self) -> int:
        """Encoder positions per attention window."""
        return conv_output_length(self.chunk_frames) * (self.n_window_infer // self.chunk_frames)


class RowsLinear(nn.Linear):
    """A linear the encoder calls on hundreds of rows at once. Its own type keeps the runner's CPU linear
    preparation (built for decode's few rows, which re-lays the weight out per call above its row limit)
    away from it: plain F.linear is faster here (60 s of audio: 2.5 s against 2.9 s for the tower)."""


def conv_output_length(frames: int) -> int:
    """Positions left after three (kernel 3, stride 2, padding 1) convolutions; 0 stays 0."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1 if frames > 0 else 0
    return frames


def audio_token_count(frames: int, chunk_frames: int = 100) -> int:
    """Encoder outputs (= placeholder tokens) for a clip of `frames` mel frames."""
    full, rest = divmod(frames, chunk_frames)
    return full * conv_output_length(chunk_frames) + conv_output_length(rest)


def sinusoids(length: int, channels: int, dtype: torch.dtype, device: torch.device,
              max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels]: sin then cos, Whisper's fixed position embedding."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, device=device).float())
    scaled = torch.arange(length, device=device)[:, None].float() * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1).to(dtype)


class AudioAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = RowsLinear(dim, dim)
        self.k_proj = RowsLinear(dim, dim)
        self.v_proj = RowsLinear(dim, dim)
        self.out_proj = RowsLinear(dim, dim)
        # The load-time preparation may swap in a native kernel (models/fast_paths.py).
        self.attend_windows = window_attention

    def forward(self, x: torch.Tensor, windows: list[tuple[int, int, int]]) -> torch.Tensor:
        """x [N, D]; windows: (start, length, count) runs of `count` consecutive windows of equal length."""
        n, d = x.shape
        q, k, v = (p(x).view(n, self.heads, d // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.attend_windows(q, k, v, windows).view(n, d))


class AudioEncoderLayer(nn.Module):
    def __init__(self, args: AudioEncoderArgs) -> None:
        super().__init__()
        self.self_attn = AudioAttention(args.d_model, args.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(args.d_model)
        self.fc1 = RowsLinear(args.d_model, args.encoder_ffn_dim)
        self.fc2 = RowsLinear(args.encoder_ffn_dim, args.d_model)
        self.final_layer_norm = nn.LayerNorm(args.d_model)
        self.act = _ACTIVATIONS[args.activation_function]

    def forward(self, x: torch.Tensor, windows: list[tuple[int, int, int]]) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """Log-mel features of several clips -> one [tokens_i, d_model] tensor per clip (before the projector)."""

    def __init__(self, args: AudioEncoderArgs) -> None:
        super().__init__()
        self.args = args
        hidden = args.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, hidden, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(hidden, hidden, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(hidden, hidden, 3, 2, padding=1)
        freq = conv_output_length(args.num_mel_bins)
        self.conv_out = RowsLinear(hidden * freq, args.d_model, bias=False)
        self.layers = nn.ModuleList([AudioEncoderLayer(args) for _ in range(args.encoder_layers)])
        self.ln_post = nn.LayerNorm(args.d_model)
        self.act = _ACTIVATIONS[args.activation_function]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features: per clip [num_mel_bins, frames_i] (all frames valid)."""
        a = self.args
        chunk = a.chunk_frames
        weight = self.conv2d1.weight
        chunks, valid = [], []  # per chunk: [mel, chunk] and its valid frame count
        for f in features:
            frames = f.shape[1]
            padded = F.pad(f.to(weight.device, weight.dtype), (0, (-frames) % chunk))
            chunks.append(padded.view(a.num_mel_bins, -1, chunk).transpose(0, 1))
            valid += [min(chunk, frames - s) for s in range(0, frames, chunk)]
        x = torch.cat(chunks).unsqueeze(1).to(memory_format=torch.channels_last)  # [C, 1, mel, chunk]
        for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
            x = self.act(_conv_channels_last(conv, x))
        c, channels, freq, steps = x.shape
        # One [C * steps, channels * freq] matrix for conv_out: as a strided 3-D view, matmul would run it
        # as a batched product with the weight copied once per chunk (60 copies of 14 MB for 60 s of audio).
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(c * steps, channels * freq)).view(c, steps, -1)
        if a.scale_embedding:
            x = x * math.sqrt(a.d_model)
        x = x + sinusoids(steps, a.d_model, x.dtype, x.device)
        keep = torch.tensor([conv_output_length(v) for v in valid], device=x.device)
        x = x[torch.arange(steps, device=x.device)[None, :] < keep[:, None]]  # [N, D], clip after clip
        lengths = [audio_token_count(f.shape[1], chunk) for f in features]
        windows = _window_runs(lengths, a.window_positions)
        for layer in self.layers:
            x = layer(x, windows)
        return list(self.ln_post(x).split(lengths))


def _conv_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) with input, weight and output in the channels-last layout: oneDNN's convolution in that layout
    took 1.3-2.1 s against 2.4-2.8 s in the default one for the 60 chunks of 60 s of audio (bfloat16, one
    thread, equal results). The weight (4 MB) is re-laid out per call so loading stays layout-agnostic;
    `.to(memory_format=...)` re-strides even a single-channel tensor, which `.contiguous(...)` leaves as is."""
    weight = conv.weight.to(memory_format=torch.channels_last)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding)


def _window_runs(lengths: list[int], window: int) -> list[tuple[int, int, int]]:
    """Attention windows of each clip as (start, length, count) runs of equal-length windows."""
    runs, start = [], 0
    for n in lengths:
        full, rest = divmod(n, window)
        if full:
            runs.append((start, window, full))
        if rest:
            runs.append((start + full * window, rest, 1))
        start += n
    return runs


class AudioProjector(nn.Module):
    """Encoder width -> the language model's width (two linears around the encoder's activation)."""

    def __init__(self, args: AudioEncoderArgs) -> None:
        super().__init__()
        self.linear_1 = RowsLinear(args.d_model, args.d_model)
        self.linear_2 = RowsLinear(args.d_model, args.output_dim)
        self.act = _ACTIVATIONS[args.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


__all__ = ["AudioEncoder", "AudioEncoderArgs", "AudioProjector", "audio_token_count", "conv_output_length"]
