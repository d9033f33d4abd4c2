"""Qwen3-Omni's Code2Wav: speech codes [G, T] -> 24 kHz waveform, whole or streamed with the same samples.

Decisions:
- Parts are Qwen3-TTS's codec decoder parts (causal convs, ConvNeXt, SnakeBeta residual blocks, a
  sliding-window transformer with layer scales) with Omni's differences: codes are looked up in one table
  at offsets g * codebook_size and averaged over the G groups; the transformer has no in/out projections;
  and the decoder blocks' transposed convolutions trim kernel - stride samples on BOTH sides (transformers'
  Qwen3OmniMoeCausalTransConvNet). So a decode of T frames gives T * U - tail samples (U = 1920).
- Two-sided trimming makes each output sample look (kernel - stride) samples ahead, so the last `tail`
  samples of any partial decode still depend on frames not yet seen; they are exactly the samples a full
  decode drops at its end. A stream therefore emits samples [P * U - tail, N * U - tail) after frames P..N-1
  arrive (vLLM-Omni's stitching rule), and holds the rest back. The first emitted sample needs only a
  bounded window of earlier frames (the conv stack's receptive field, computed from the module sizes, not
  guessed), and the transformer keeps its last sliding_window - 1 keys and values per layer, so a stream of
  any chunking equals the one-shot decode up to float reassociation.
- `decode` (one shot) equals transformers' `chunked_decode(codes, 300, 25)` for up to 300 frames, which is
  every reply transformers' generate decodes in one piece; longer replies are where transformers' own
  re-decoding with 25 frames of context departs from the exact decode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from qwenstack.config import ModelArgs, RopeConfig
from qwenstack.models.layers import RMSNorm, RotaryEmbedding
from qwenstack.models.qwen3_tts_codec import (
    CausalConv, CausalTransConv, CodecAttention, CodecDecoderArgs, ConvNeXtBlock, LayerScale, ResidualUnit, SnakeBeta,
)
from qwenstack.models.layers import SwiGLU


@dataclass(kw_only=True)
class Code2WavArgs(ModelArgs):
    """`code2wav_config` of a Qwen3-Omni config.json."""

    model_type: ClassVar[str] = "qwen3_omni_moe_code2wav"
    derived_fields: ClassVar[tuple[str, ...]] = ("rope",)
    codebook_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int
    num_quantizers: int
    upsample_rates: list[int]
    upsampling_ratios: list[int]
    decoder_dim: int
    sliding_window: int = 72
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    hidden_act: str = "silu"
    sample_rate: int = 24000
    rope: RopeConfig = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if "rope_parameters" not in config and "rope_theta" not in config:
            config = {**config, "rope_theta": 10000.0}  # transformers' Code2Wav default base
        self.rope = RopeConfig.from_config(config, self.model_type)

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios)


class TwoSidedTransConv(CausalTransConv):
    """ConvTranspose1d trimmed by kernel - stride on both sides: T frames in, T * stride - (kernel - stride) out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        trim = self.kernel - self.stride
        return y[..., trim: y.shape[-1] - trim] if trim > 0 else y

    def first_input(self, n: int) -> int:
        # Output n is untrimmed output m = n + trim, which reads inputs i with i * s <= m <= i * s + k - 1.
        trim = self.kernel - self.stride
        return -((self.kernel - 1 - n - trim) // self.stride)  # ceil((m - k + 1) / s)


def _first_input(layer: nn.Module, n: int) -> int:
    """The earliest input index output n of a stride-1 causal layer (or a two-sided trans conv) reads."""
    if isinstance(layer, TwoSidedTransConv):
        return layer.first_input(n)
    if isinstance(layer, CausalConv):
        return n - layer.left
    if isinstance(layer, ConvNeXtBlock):
        return n - layer.dwconv.left
    if isinstance(layer, ResidualUnit):
        return n - layer.conv1.left - layer.conv2.left
    if isinstance(layer, SnakeBeta):
        return n
    if isinstance(layer, (Code2WavBlock, nn.ModuleList)):
        for inner in reversed(list(layer.block if isinstance(layer, Code2WavBlock) else layer)):
            n = _first_input(inner, n)
        return n
    raise TypeError(f"no receptive-field rule for {type(layer).__name__}")


class Code2WavBlock(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([SnakeBeta(cin), TwoSidedTransConv(cin, cout, 2 * rate, rate)]
                                   + [ResidualUnit(cout, d) for d in (1, 3, 9)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            x = layer(x)
        return x


class Code2WavLayer(nn.Module):
    def __init__(self, args: CodecDecoderArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = CodecAttention(args, rotary)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(args.hidden_size)
        self.mlp_layer_scale = LayerScale(args.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, past: list[torch.Tensor] | None) -> tuple[
            torch.Tensor, list[torch.Tensor]]:
        h, past = self.self_attn(self.input_layernorm(x), positions, past)
        x = x + self.self_attn_layer_scale.scale * h
        return x + self.mlp_layer_scale.scale * self.mlp(self.post_attention_layernorm(x)), past


class Code2WavTransformer(nn.Module):
    def __init__(self, args: Code2WavArgs) -> None:
        super().__init__()
        assert args.head_dim is not None
        # The TTS codec's attention reads these fields; latent_dim etc. are unused by it.
        codec_args = CodecDecoderArgs(
            codebook_size=args.codebook_size, codebook_dim=args.hidden_size, hidden_size=args.hidden_size,
            latent_dim=args.hidden_size, num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads, intermediate_size=args.intermediate_size,
            num_hidden_layers=args.num_hidden_layers, num_quantizers=args.num_quantizers,
            upsample_rates=args.upsample_rates, upsampling_ratios=args.upsampling_ratios,
            decoder_dim=args.decoder_dim, sliding_window=args.sliding_window, head_dim=args.head_dim,
            rms_norm_eps=args.rms_norm_eps, attention_bias=args.attention_bias)
        codec_args.head_dim, codec_args.rope = args.head_dim, args.rope
        rotary = RotaryEmbedding(args.rope, args.head_dim)
        self.layers = nn.ModuleList([Code2WavLayer(codec_args, rotary) for _ in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, start: int, past: list[list[torch.Tensor] | None]) -> torch.Tensor:
        """x [n, hidden] at absolute positions start..; `past` (one entry per layer) is updated in place."""
        positions = torch.arange(start, start + x.shape[0], device=x.device)
        for i, layer in enumerate(self.layers):
            x, past[i] = layer(x, positions, past[i])
        return self.norm(x)


class Code2Wav(nn.Module):
    """Names equal the checkpoint's under `code2wav.`."""

    def __init__(self, args: Code2WavArgs) -> None:
        super().__init__()
        self.args = args
        h = args.hidden_size
        self.code_embedding = nn.Embedding(args.codebook_size * args.num_quantizers, h)
        self.pre_transformer = Code2WavTransformer(args)
        self.upsample = nn.ModuleList([nn.ModuleList([TwoSidedTransConv(h, h, r, r), ConvNeXtBlock(h)])
                                       for r in args.upsampling_ratios])
        dims = [args.decoder_dim // 2**i for i in range(len(args.upsample_rates) + 1)]
        self.decoder = nn.ModuleList(
            [CausalConv(h, args.decoder_dim, 7)]
            + [Code2WavBlock(dims[i], dims[i + 1], r) for i, r in enumerate(args.upsample_rates)]
            + [SnakeBeta(dims[-1]), CausalConv(dims[-1], 1, 7)])
        self.samples_per_frame = args.samples_per_frame
        self.tail = self._tail()
        self.context_frames = self._context_frames()

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n, G] -> [n, hidden]: the mean of each group's row at offset g * codebook_size."""
        offsets = torch.arange(codes.shape[1], device=codes.device) * self.args.codebook_size
        return self.code_embedding(codes.long() + offsets).mean(1)

    def conv_stack(self, latent: torch.Tensor) -> torch.Tensor:
        """[1, hidden, n] after the transformer -> waveform [n * U - tail], clamped to [-1, 1]."""
        h = latent
        for pair in self.upsample:
            for layer in pair:
                h = layer(h)
        for layer in self.decoder:
            h = layer(h)
        return h[0, 0].clamp(-1, 1)

    def _layers(self) -> list[nn.Module]:
        return [layer for pair in self.upsample for layer in pair] + list(self.decoder)

    def _tail(self) -> int:
        """Samples a decode of n frames falls short of n * U (the same for every n)."""
        length = 1
        for layer in self._layers():
            for inner in (layer.block if isinstance(layer, Code2WavBlock) else [layer]):
                if isinstance(inner, TwoSidedTransConv):
                    length = length * inner.stride - (inner.kernel - inner.stride)
        return self.samples_per_frame - length

    def _first_frame(self, sample: int) -> int:
        """The earliest frame that sample `sample` of a decode depends on."""
        n = sample
        for layer in reversed(self._layers()):
            n = _first_input(layer, n)
        return n

    def _context_frames(self) -> int:
        """Frames before frame P that the first sample emitted after P (P * U - tail) still reads; the rule is
        periodic in P, so one period of P decides."""
        u, far = self.samples_per_frame, 1_000_000
        return max(p - self._first_frame(p * u - self.tail) for p in range(far, far + u))

    def stream(self) -> "Code2WavStream":
        return Code2WavStream(self)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [T, G] -> waveform [T * U - tail] (float32): one push into a fresh stream."""
        return self.stream().push(codes)

    @property
    def sample_rate(self) -> int:
        return self.args.sample_rate


class Code2WavStream:
    """Push frames, get the samples that are final; the concatenation equals `decode` of all frames."""

    def __init__(self, model: Code2Wav) -> None:
        self.model = model
        weight = model.code_embedding.weight
        self.latent = torch.zeros(1, model.args.hidden_size, 0, dtype=weight.dtype, device=weight.device)
        self.past: list[list[torch.Tensor] | None] = [None] * model.args.num_hidden_layers
        self.frames = 0  # frames pushed so far
        self.emitted = 0  # samples returned so far

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        m = self.model
        n = codes.shape[0]
        if n == 0:
            return torch.zeros(0)
        h = m.pre_transformer(m.embed(codes.to(self.latent.device)), self.frames, self.past)
        self.latent = torch.cat([self.latent, h.T[None]], dim=-1)
        self.frames += n
        kept = self.latent.shape[-1]  # latent frames frames - kept .. frames - 1
        wave = m.conv_stack(self.latent)
        first = self.frames - kept  # global frame of local index 0
        end = self.frames * m.samples_per_frame - m.tail
        out = wave[self.emitted - first * m.samples_per_frame: end - first * m.samples_per_frame]
        self.emitted = max(self.emitted, end)
        # Keep the frames the next push's first emitted sample can still read.
        keep = min(self.latent.shape[-1], m.context_frames)
        self.latent = self.latent[..., self.latent.shape[-1] - keep:]
        return out.float()


__all__ = ["Code2Wav", "Code2WavArgs", "Code2WavStream"]
