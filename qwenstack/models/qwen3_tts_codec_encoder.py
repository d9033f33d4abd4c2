"""The Qwen3-TTS 12 Hz speech tokenizer's encoder (the `encoder.*` half of speech_tokenizer/): 24 kHz audio ->
codes, for cloning a voice from a reference clip with its transcript (ICL mode).

It is a Mimi encoder (Défossez et al., arXiv 2410.00037) with its decoder half removed:
- SEANet convolutions, all causal (left padding kernel - stride, zeros; extra right padding so a strided
  conv covers the input), ELU activations, residual blocks with an identity shortcut;
- a causal transformer at 25 Hz (LayerNorm with bias, RoPE, GELU MLP, LayerScale; no final norm);
- a strided conv (k4 s2, replicate padding) to 12.5 Hz;
- a split residual vector quantizer: semantic and acoustic RVQs, each with its own input projection,
  nearest codebook vector by Euclidean distance, then the residual goes on to the next quantizer.
Module names follow the checkpoint (encoder.encoder.layers.{i}, encoder.encoder_transformer.*,
encoder.downsample, encoder.quantizer.*); the config is the checkpoint's `encoder_config` (a MimiConfig).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.config import ModelArgs, RopeConfig
from qwenstack.models.layers import RotaryEmbedding, apply_rotary


@dataclass(kw_only=True)
class MimiEncoderArgs(ModelArgs):
    model_type: ClassVar[str] = "mimi"
    derived_fields: ClassVar[tuple[str, ...]] = ("rope",)
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    codebook_size: int
    codebook_dim: int
    num_quantizers: int
    upsampling_ratios: list[int]
    num_filters: int
    num_residual_layers: int
    head_dim: int | None = None
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int | None = None
    audio_channels: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sampling_rate: int = 24000
    frame_rate: float = 12.5
    hidden_act: str = "gelu"
    use_conv_shortcut: bool = False
    use_causal_conv: bool = True
    rope: RopeConfig = field(init=False)

    aliases: ClassVar[dict[str, str]] = {"_frame_rate": "frame_rate"}

    def validate(self, config: dict[str, Any]) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.vector_quantization_hidden_dimension is None:
            self.vector_quantization_hidden_dimension = self.hidden_size
        if not self.use_causal_conv or self.use_conv_shortcut or self.hidden_act != "gelu":
            raise ValueError("only the causal, shortcut-free, GELU Mimi encoder of Qwen3-TTS is supported")
        self.rope = RopeConfig("default", float(self.rope_theta))

    @property
    def encodec_frame_rate(self) -> float:
        return self.sampling_rate / math.prod(self.upsampling_ratios)


class MimiConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, bias: bool = True,
                 pad_mode: str = "constant") -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, bias=bias)
        self.kernel = (kernel - 1) * dilation + 1
        self.stride, self.pad_mode = stride, pad_mode
        self.left = self.kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        frames = math.ceil((length - self.kernel + self.left) / self.stride + 1) - 1
        extra = frames * self.stride + self.kernel - self.left - length
        return self.conv(F.pad(x, (self.left, extra), mode=self.pad_mode))


class ResnetBlock(nn.Module):
    def __init__(self, args: MimiEncoderArgs, dim: int, dilation: int) -> None:
        super().__init__()
        hidden = dim // args.compress
        # Indices 0 and 2 are the ELUs (no parameters), as in the checkpoint's block.{1,3}.
        self.block = nn.ModuleList([nn.ELU(), MimiConv(dim, hidden, args.residual_kernel_size, dilation=dilation),
                                    nn.ELU(), MimiConv(hidden, dim, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.block:
            h = layer(h)
        return x + h


class SEANetEncoder(nn.Module):
    def __init__(self, args: MimiEncoderArgs) -> None:
        super().__init__()
        layers: list[nn.Module] = [MimiConv(args.audio_channels, args.num_filters, args.kernel_size)]
        scale = 1
        for ratio in reversed(args.upsampling_ratios):
            dim = scale * args.num_filters
            layers += [ResnetBlock(args, dim, args.dilation_growth_rate**j) for j in range(args.num_residual_layers)]
            layers += [nn.ELU(), MimiConv(dim, dim * 2, 2 * ratio, stride=ratio)]
            scale *= 2
        layers += [nn.ELU(), MimiConv(scale * args.num_filters, args.hidden_size, args.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MimiAttention(nn.Module):
    def __init__(self, args: MimiEncoderArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        assert args.head_dim is not None
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, args.hidden_size, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        q = apply_rotary(self.q_proj(x).view(n, self.heads, self.head_dim), cos, sin).transpose(0, 1)
        k = apply_rotary(self.k_proj(x).view(n, self.kv_heads, self.head_dim), cos, sin).transpose(0, 1)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out[0].transpose(0, 1).reshape(n, -1))


class _Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class _MLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, inner, bias=False)
        self.fc2 = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MimiLayer(nn.Module):
    def __init__(self, args: MimiEncoderArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = MimiAttention(args, rotary)
        self.mlp = _MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.self_attn_layer_scale = _Scale(args.hidden_size)
        self.mlp_layer_scale = _Scale(args.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn_layer_scale.scale * self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp_layer_scale.scale * self.mlp(self.post_attention_layernorm(x))


class MimiTransformer(nn.Module):
    def __init__(self, args: MimiEncoderArgs) -> None:
        super().__init__()
        assert args.head_dim is not None
        rotary = RotaryEmbedding(args.rope, args.head_dim)
        self.layers = nn.ModuleList([MimiLayer(args, rotary) for _ in range(args.num_hidden_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[0], device=x.device)
        for layer in self.layers:
            x = layer(x, positions)
        return x


class _Codebook(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.initialized = nn.Parameter(torch.ones(1))
        self.cluster_usage = nn.Parameter(torch.ones(size))
        self.embed_sum = nn.Parameter(torch.zeros(size, dim))

    def embed(self) -> torch.Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=1e-5)[:, None]


class _VQ(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.codebook = _Codebook(size, dim)


class MimiRVQ(nn.Module):
    def __init__(self, args: MimiEncoderArgs, n: int) -> None:
        super().__init__()
        dim = args.vector_quantization_hidden_dimension
        assert dim is not None
        self.layers = nn.ModuleList([_VQ(args.codebook_size, args.codebook_dim) for _ in range(n)])
        self.input_proj = nn.Conv1d(args.hidden_size, dim, 1, bias=False) if dim != args.hidden_size else None
        self.output_proj = nn.Conv1d(dim, args.hidden_size, 1, bias=False) if dim != args.hidden_size else None

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [1, hidden, T] -> codes [T, n]."""
        if self.input_proj is not None:
            x = self.input_proj(x)
        residual = x[0].T
        codes = []
        for layer in self.layers[:n]:
            embed = layer.codebook.embed()
            index = torch.cdist(residual[None].float(), embed[None].float())[0].argmin(-1)
            residual = residual - F.embedding(index, embed)
            codes.append(index)
        return torch.stack(codes, dim=1)


class MimiSplitRVQ(nn.Module):
    def __init__(self, args: MimiEncoderArgs) -> None:
        super().__init__()
        self.semantic_count = args.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = MimiRVQ(args, args.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = MimiRVQ(args, args.num_quantizers - args.num_semantic_quantizers)

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        codes = self.semantic_residual_vector_quantizer.encode(x, self.semantic_count)
        if n > self.semantic_count:
            rest = self.acoustic_residual_vector_quantizer.encode(x, n - self.semantic_count)
            codes = torch.cat([codes, rest], dim=1)
        return codes


class MimiEncoderModel(nn.Module):
    def __init__(self, args: MimiEncoderArgs) -> None:
        super().__init__()
        self.args = args
        self.encoder = SEANetEncoder(args)
        self.encoder_transformer = MimiTransformer(args)
        stride = round(args.encodec_frame_rate / args.frame_rate)
        self.downsample = MimiConv(args.hidden_size, args.hidden_size, 2 * stride, stride=2, bias=False,
                                   pad_mode="replicate")
        self.quantizer = MimiSplitRVQ(args)

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor, num_quantizers: int, samples_per_frame: int) -> torch.Tensor:
        """Mono samples [N] at the tokenizer's rate -> codes [ceil(N / samples_per_frame), num_quantizers]."""
        param = self.downsample.conv.weight
        x = self.encoder(wave.to(param.device, param.dtype)[None, None])
        x = self.encoder_transformer(x[0].T).T[None]
        codes = self.quantizer.encode(self.downsample(x), num_quantizers)
        return codes[: -(-wave.numel() // samples_per_frame)]
