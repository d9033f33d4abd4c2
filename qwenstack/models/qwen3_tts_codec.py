"""The Qwen3-TTS 12 Hz speech tokenizer's decoder (model_type "qwen3_tts_tokenizer_12hz"): codes -> 24 kHz audio,
whole or streamed chunk by chunk with the same result.

Decisions:
- Every part of the decoder is causal: the split RVQ lookup, a causal conv (k3), a sliding-window
  transformer (window W), causal transposed convolutions trimmed on the right only, causal convs and
  SnakeBeta blocks. So a stream can produce exactly the full decode:
    * the transformer keeps, per layer, the keys and values of its last W - 1 positions (a query sees W
      keys, itself included), at absolute positions;
    * the conv stack is re-run over a few frames of left context whose count is its receptive field,
      computed from the module sizes (`conv_context_frames`), and the samples of those frames dropped;
    * pre_conv keeps its kernel - 1 frames of codes.
  A full decode is one push of all frames into a fresh stream, and every frame is computed on a fixed
  grid of 4-frame blocks with the same tensor shapes whatever the pushes were (CodecStream says why), so
  a stream equals the full decode bit for bit in float32 too. This is exact for any utterance length,
  unlike re-decoding a fixed left context of 72 frames (vLLM-Omni), exact only while the utterance fits.
- Module names follow the checkpoint (decoder.quantizer..., decoder.pre_transformer..., decoder.upsample...,
  decoder.decoder...). The encoder half of the checkpoint (`encoder.*`, a Mimi encoder) is
  qwen3_tts_codec_encoder.py; the decoder quantizer's input projections, unused at inference, are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.config import ModelArgs, RopeConfig
from qwenstack.errors import RequestError
from qwenstack.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from qwenstack.models.qwen3_tts_codec_encoder import MimiEncoderArgs, MimiEncoderModel


@dataclass(kw_only=True)
class CodecDecoderArgs(ModelArgs):
    model_type: ClassVar[str] = "qwen3_tts_tokenizer_12hz_decoder"
    derived_fields: ClassVar[tuple[str, ...]] = ("rope",)
    codebook_size: int
    codebook_dim: int
    hidden_size: int
    latent_dim: int
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
    rope_theta: float = 10000.0
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope: RopeConfig = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope = RopeConfig("default", float(self.rope_theta))

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios)


@dataclass(kw_only=True)
class Codec12HzArgs(ModelArgs):
    model_type: ClassVar[str] = "qwen3_tts_tokenizer_12hz"
    derived_fields: ClassVar[tuple[str, ...]] = ("decoder",)
    decoder_config: dict[str, Any]
    encoder_config: dict[str, Any] = field(default_factory=dict)
    encoder_valid_num_quantizers: int = 16
    input_sample_rate: int = 24000
    output_sample_rate: int = 24000
    decode_upsample_rate: int = 1920
    encode_downsample_rate: int = 1920
    decoder: CodecDecoderArgs = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        self.decoder = CodecDecoderArgs.from_dict(self.decoder_config)


class CausalConv(nn.Module):
    """Conv1d padded on the left by (kernel - 1) * dilation: output t sees inputs <= t (stride 1)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, groups=groups)
        self.left = (kernel - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left, 0)))

    def context(self, need: int) -> int:
        return need + self.left


class CausalTransConv(nn.Module):
    """ConvTranspose1d whose last kernel - stride outputs are dropped: T frames in, T * stride out."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, kernel, stride=stride)
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        trim = self.kernel - self.stride
        return y[..., : y.shape[-1] - trim] if trim > 0 else y

    def context(self, need: int) -> int:
        # Output n depends on inputs i with i * stride <= n <= i * stride + kernel - 1.
        return (need + self.kernel - 1) // self.stride


class SnakeBeta(nn.Module):
    """x + sin^2(x * e^alpha) / e^beta, per channel (log-scale parameters)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)

    def context(self, need: int) -> int:
        return need


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)

    def context(self, need: int) -> int:
        return self.dwconv.context(need)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))

    def context(self, need: int) -> int:
        return self.conv1.context(self.conv2.context(need))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([SnakeBeta(cin), CausalTransConv(cin, cout, 2 * rate, rate)]
                                   + [ResidualUnit(cout, d) for d in (1, 3, 9)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            x = layer(x)
        return x

    def context(self, need: int) -> int:
        for layer in reversed(self.block):
            need = layer.context(need)
        return need


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.cluster_usage = nn.Parameter(torch.ones(size))
        self.embedding_sum = nn.Parameter(torch.zeros(size, dim))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embedding_sum / self.cluster_usage.clamp(min=1e-5)[:, None])


class _VQ(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(size, dim)


class _VQLayers(nn.Module):
    def __init__(self, n: int, size: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_VQ(size, dim) for _ in range(n)])


class ResidualVQ(nn.Module):
    """Sum of the codebook vectors of each quantizer, then a 1x1 projection back to codebook_dim."""

    def __init__(self, n: int, size: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.vq = _VQLayers(n, size, dim)
        self.output_proj = nn.Conv1d(dim, out_dim, 1, bias=False)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T, n] -> [1, out_dim, T]."""
        total = sum(layer._codebook.decode(codes[:, i]) for i, layer in enumerate(self.vq.layers))
        return self.output_proj(total.T[None])


class SplitRVQ(nn.Module):
    """One semantic quantizer and the acoustic rest, each with its own projection."""

    def __init__(self, args: CodecDecoderArgs) -> None:
        super().__init__()
        dim = args.codebook_dim // 2
        self.rvq_first = ResidualVQ(1, args.codebook_size, dim, args.codebook_dim)
        self.rvq_rest = ResidualVQ(args.num_quantizers - 1, args.codebook_size, dim, args.codebook_dim)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.rvq_first.decode(codes[:, :1]) + self.rvq_rest.decode(codes[:, 1:])


class CodecAttention(nn.Module):
    """Sliding-window attention without QK norm; `past` holds the last window - 1 keys and values."""

    def __init__(self, args: CodecDecoderArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        assert args.head_dim is not None
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, args.hidden_size, bias=bias)
        self.window = args.sliding_window
        self.rotary = rotary

    def forward(self, x: torch.Tensor, positions: torch.Tensor, past: list[torch.Tensor] | None) -> tuple[
            torch.Tensor, list[torch.Tensor]]:
        n = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        q = apply_rotary(self.q_proj(x).view(n, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(n, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        if past is not None:
            k, v = torch.cat([past[0], k]), torch.cat([past[1], v])
        ctx = k.shape[0] - n
        rows = torch.arange(ctx, ctx + n, device=x.device)[:, None]
        cols = torch.arange(ctx + n, device=x.device)[None, :]
        # Past rows at negative absolute positions are padding (a stream keeps a fixed-size past).
        mask = (cols <= rows) & (cols > rows - self.window) & (cols + (positions[0] - ctx) >= 0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
            enable_gqa=self.heads != self.kv_heads)
        keep = min(self.window - 1, k.shape[0])
        return self.o_proj(out[0].transpose(0, 1).reshape(n, -1)), [k[k.shape[0] - keep:], v[v.shape[0] - keep:]]


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class CodecTransformerLayer(nn.Module):
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
        x = x + self.mlp_layer_scale.scale * self.mlp(self.post_attention_layernorm(x))
        return x, past


class CodecTransformer(nn.Module):
    def __init__(self, args: CodecDecoderArgs) -> None:
        super().__init__()
        assert args.head_dim is not None
        rotary = RotaryEmbedding(args.rope, args.head_dim)
        self.input_proj = nn.Linear(args.latent_dim, args.hidden_size)
        self.layers = nn.ModuleList([CodecTransformerLayer(args, rotary) for _ in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.output_proj = nn.Linear(args.hidden_size, args.latent_dim)

    def forward(self, x: torch.Tensor, start: int, past: list[list[torch.Tensor] | None]) -> torch.Tensor:
        """x [n, latent] at absolute positions start.. ; `past` (one entry per layer) is updated in place."""
        positions = torch.arange(start, start + x.shape[0], device=x.device)
        h = self.input_proj(x)
        for i, layer in enumerate(self.layers):
            h, past[i] = layer(h, positions, past[i])
        return self.output_proj(self.norm(h))


class CodecDecoder(nn.Module):
    # Frames per block of the exact streaming grid (CodecStream): the serving engine's chunk, so a streamed
    # chunk costs one conv window of C + 4 frames.
    block_frames: ClassVar[int] = 4

    def __init__(self, args: CodecDecoderArgs) -> None:
        super().__init__()
        self.args = args
        self.quantizer = SplitRVQ(args)
        self.pre_conv = CausalConv(args.codebook_dim, args.latent_dim, 3)
        self.pre_transformer = CodecTransformer(args)
        self.upsample = nn.ModuleList([
            nn.ModuleList([CausalTransConv(args.latent_dim, args.latent_dim, r, r), ConvNeXtBlock(args.latent_dim)])
            for r in args.upsampling_ratios])
        dims = [args.decoder_dim // 2**i for i in range(len(args.upsample_rates) + 1)]
        self.decoder = nn.ModuleList(
            [CausalConv(args.latent_dim, args.decoder_dim, 7)]
            + [DecoderBlock(dims[i], dims[i + 1], r) for i, r in enumerate(args.upsample_rates)]
            + [SnakeBeta(dims[-1]), CausalConv(dims[-1], 1, 7)])

    def conv_stack(self, latent: torch.Tensor) -> torch.Tensor:
        """[1, latent, T] after the transformer -> waveform [T * samples_per_frame], clamped to [-1, 1]."""
        h = latent
        for pair in self.upsample:
            for layer in pair:
                h = layer(h)
        for layer in self.decoder:
            h = layer(h)
        return h[0, 0].clamp(-1, 1)

    def conv_context_frames(self) -> int:
        """Frames of left context after which the conv stack's output no longer depends on earlier frames."""
        need = 0
        for layer in reversed(self.decoder):
            need = layer.context(need)
        for pair in reversed(self.upsample):
            for layer in reversed(pair):
                need = layer.context(need)
        return need

    def stream(self) -> "CodecStream":
        return CodecStream(self)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [T, num_quantizers] -> waveform [T * samples_per_frame] (float32)."""
        return self.stream().push(codes)


class CodecStream:
    """Incremental decoding: push frames of codes, get their samples; bitwise the same as one decode of all
    frames, however the frames are split into pushes.

    Frames are decoded on a fixed grid of blocks of `block_frames`. Block k (frames kB..kB+B-1) always runs
    with the same tensor shapes: the codes of frames kB-2.. for pre_conv, B rows in the transformer over a
    past of exactly window - 1 keys (zero padding, masked, before frame 0) and a conv-stack window of frames
    kB-C..kB+B-1 (C = the conv stack's receptive field, fewer at the start). A block that is not complete
    yet runs with zero codes in place of its missing frames, which every later layer is causal to, and is
    run again when more frames come; only a complete block moves the state on.
    Why: CPU kernels pick their algorithm and summation order by tensor shape (oneDNN convolutions switch
    algorithms with the length, MKL's GEMM with the row count), so the same frame computed in a window of
    another length differs by float32 rounding, which the codec's gains amplify past 1e-5. Equal shapes
    per frame make the stream equal the full decode exactly.
    """

    def __init__(self, decoder: CodecDecoder) -> None:
        self.decoder = decoder
        args = decoder.args
        weight = decoder.pre_conv.conv.weight
        self.block = decoder.block_frames
        self.codes_tail = torch.zeros(0, args.num_quantizers, dtype=torch.long, device=weight.device)
        self.block_codes = self.codes_tail
        self.latent_tail = torch.zeros(1, args.latent_dim, 0, device=weight.device, dtype=weight.dtype)
        assert args.head_dim is not None
        keep = args.sliding_window - 1
        pad = torch.zeros(keep, args.num_key_value_heads, args.head_dim, device=weight.device, dtype=weight.dtype)
        self.past: list[list[torch.Tensor] | None] = [[pad, pad] for _ in range(args.num_hidden_layers)]
        self.frames = 0  # frames pushed
        self.block_start = 0  # first frame of the block in progress
        self.conv_context = decoder.conv_context_frames()

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n, num_quantizers] -> the samples of those n frames (float32)."""
        out = []
        codes = codes.to(self.codes_tail.device).long()
        while codes.shape[0]:
            take = self.block - self.block_codes.shape[0]
            self.block_codes = torch.cat([self.block_codes, codes[:take]])
            new, codes = min(take, codes.shape[0]), codes[take:]
            have = self.block_codes.shape[0]
            spf = self.decoder.args.samples_per_frame
            out.append(self._run_block()[(have - new) * spf: have * spf])
            self.frames += new
        return torch.cat(out).float() if out else torch.zeros(0)

    def _run_block(self) -> torch.Tensor:
        """Decodes the block in progress (missing frames as zero codes); returns its B frames' samples and,
        once the block is complete, moves the state on to the next block."""
        d, b = self.decoder, self.block
        have = self.block_codes.shape[0]
        missing = self.block_codes.new_zeros(b - have, self.block_codes.shape[1])
        codes = torch.cat([self.codes_tail, self.block_codes, missing])
        h = d.pre_conv(d.quantizer.decode(codes))[..., -b:]  # [1, latent, B]
        past = list(self.past)  # the transformer replaces entries; kept only when the block is complete
        h = d.pre_transformer(h[0].T, self.block_start, past).T[None]
        latent = torch.cat([self.latent_tail, h], dim=-1)
        wave = d.conv_stack(latent)[self.latent_tail.shape[-1] * d.args.samples_per_frame:]
        if have == b:
            self.past = past
            self.block_start += b
            left = d.pre_conv.left
            self.codes_tail = codes[codes.shape[0] - left:] if left else codes[:0]
            self.latent_tail = latent[..., max(0, latent.shape[-1] - self.conv_context):]
            self.block_codes = self.block_codes[:0]
        return wave


class Codec12Hz(nn.Module):
    """The speech tokenizer checkpoint (speech_tokenizer/ of a Qwen3-TTS model), decoder side."""

    args_class: ClassVar[type[Codec12HzArgs]] = Codec12HzArgs

    def __init__(self, args: Codec12HzArgs) -> None:
        super().__init__()
        self.args = args
        self.decoder = CodecDecoder(args.decoder)
        # The encoder (reference clips -> codes, for ICL cloning); a checkpoint without it only decodes.
        self.encoder = MimiEncoderModel(MimiEncoderArgs.from_dict(args.encoder_config)) if args.encoder_config else None
        # The decoder's quantizer input projections serve encoding in training only.
        self.ignored_checkpoint_patterns: tuple[str, ...] = (r"decoder\.quantizer\.rvq_(first|rest)\.input_proj\.weight",)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono samples at the input rate -> codes [frames, num_quantizers] (ceil(samples / 1920) frames)."""
        if self.encoder is None:
            raise RequestError("this speech tokenizer has no encoder, so it cannot read reference audio")
        return self.encoder.encode(wave, self.args.encoder_valid_num_quantizers, self.args.encode_downsample_rate)

    @property
    def sample_rate(self) -> int:
        return self.args.output_sample_rate
