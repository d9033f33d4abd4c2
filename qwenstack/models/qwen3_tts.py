"""Qwen3-TTS (model_type "qwen3_tts"): the talker, its code predictor, and the speaker encoder of Base models.

Decisions:
- The talker is a Qwen3 decoder (the shared DecoderLayer: GQA, QK-RMSNorm, SwiGLU) whose inputs are
  embeddings, never token ids: each position is a text embedding (text_embedding -> text_projection) plus a
  codec embedding. Its rotary is interleaved M-RoPE, but speech positions are text-like (the three streams
  are equal), where M-RoPE is exactly the plain 1-D rotary, so the plain one is used.
- The code predictor is a small Qwen3 decoder run once per talker step as a sub-decoder: its input is the
  talker's last hidden state and the embedding of the first code, and it fills codes 1..G-1 one by one.
  Its KV lives in a scratch tensor of one block per request, paged through the same attention code.
- Checkpoint names are the published ones (talker.model.*, talker.code_predictor.*, speaker_encoder.*);
  `checkpoint_sources` fuses q/k/v and gate/up as everywhere else in qwenstack.
- Prompt layout (`SpeechPrompt`) mirrors qwen-tts 0.1.1 `Qwen3TTSForConditionalGeneration.generate`
  (shared/reference/speech-and-images.md §1.2): role tokens, the codec prefix (think/language/speaker),
  then either the whole text (non-streaming text layout) or one text token per step (dual track).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.config import ModelArgs
from qwenstack.errors import ConfigError, RequestError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec
from qwenstack.models.ecapa import SpeakerEncoder, SpeakerEncoderArgs
from qwenstack.models.layers import RMSNorm, RotaryEmbedding, SwiGLU
from qwenstack.models.qwen3 import DecoderLayer, Qwen3Args


@dataclass(kw_only=True)
class CodePredictorArgs(Qwen3Args):
    model_type: ClassVar[str] = "qwen3_tts_talker_code_predictor"
    num_code_groups: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768


@dataclass(kw_only=True)
class TalkerArgs(Qwen3Args):
    model_type: ClassVar[str] = "qwen3_tts_talker"
    derived_fields: ClassVar[tuple[str, ...]] = ("rope", "code_predictor")
    text_vocab_size: int
    text_hidden_size: int
    num_code_groups: int
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_token_id: int
    codec_think_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    code_predictor_config: dict[str, Any]
    spk_id: dict[str, int] = field(default_factory=dict)
    spk_is_dialect: dict[str, Any] = field(default_factory=dict)
    codec_language_id: dict[str, int] = field(default_factory=dict)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    code_predictor: CodePredictorArgs = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        super().validate(config)
        self.code_predictor = CodePredictorArgs.from_dict(self.code_predictor_config)
        if self.code_predictor.num_code_groups != self.num_code_groups:
            raise ConfigError("talker and code predictor disagree on num_code_groups")


@dataclass(kw_only=True)
class Qwen3TTSArgs(ModelArgs):
    model_type: ClassVar[str] = "qwen3_tts"
    derived_fields: ClassVar[tuple[str, ...]] = ("talker", "speaker_encoder")
    talker_config: dict[str, Any]
    tts_model_type: str
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    speaker_encoder_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_type: str = "qwen3_tts_tokenizer_12hz"
    tts_model_size: str | None = None
    talker: TalkerArgs = field(init=False)
    speaker_encoder: SpeakerEncoderArgs | None = field(init=False)

    KINDS: ClassVar[tuple[str, ...]] = ("custom_voice", "voice_design", "base")

    def validate(self, config: dict[str, Any]) -> None:
        if self.tts_model_type not in self.KINDS:
            raise ConfigError(f"tts_model_type '{self.tts_model_type}' is not one of {', '.join(self.KINDS)}")
        if self.tokenizer_type != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(f"tokenizer_type '{self.tokenizer_type}' is not supported (only the 12 Hz tokenizer)")
        self.talker = TalkerArgs.from_dict(self.talker_config)
        self.speaker_encoder = (SpeakerEncoderArgs.from_dict(self.speaker_encoder_config)
                                if self.tts_model_type == "base" else None)

    @property
    def languages(self) -> list[str]:
        """What a request may name: "auto" plus every language that is not a dialect."""
        return ["auto"] + [name for name in self.talker.codec_language_id if "dialect" not in name]


class DecoderStack(nn.Module):
    """Qwen3 decoder layers + final norm over input embeddings (the talker and the code predictor)."""

    def __init__(self, args: Qwen3Args) -> None:
        super().__init__()
        assert args.head_dim is not None
        rotary = RotaryEmbedding(args.rope, args.head_dim)
        self.layers = nn.ModuleList([
            DecoderLayer(args, SwiGLU(args.hidden_size, args.intermediate_size), rotary)
            for _ in range(args.num_hidden_layers)
        ])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def run(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
            kv_caches: list[torch.Tensor] | None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, batch, None if kv_caches is None else kv_caches[i])
        return self.norm(x)


class TalkerModel(DecoderStack):
    def __init__(self, args: TalkerArgs) -> None:
        super().__init__(args)
        self.codec_embedding = nn.Embedding(args.vocab_size, args.hidden_size)
        self.text_embedding = nn.Embedding(args.text_vocab_size, args.text_hidden_size)


class ResizeMLP(nn.Module):
    """text_projection: text hidden -> talker hidden through one SiLU layer, with biases."""

    def __init__(self, in_size: int, mid_size: int, out_size: int) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(in_size, mid_size, bias=True)
        self.linear_fc2 = nn.Linear(mid_size, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class CodePredictorModel(DecoderStack):
    def __init__(self, args: CodePredictorArgs, talker_hidden: int) -> None:
        super().__init__(args)
        # Embeddings of codes 1..G-1, in the talker's width (they are summed into the talker's next input too).
        self.codec_embedding = nn.ModuleList(
            [nn.Embedding(args.vocab_size, talker_hidden) for _ in range(args.num_code_groups - 1)])


# Chooses one code per row of a [B, V] logits tensor; `group` is the code group being filled (1..G-1).
CodeChooser = Callable[[int, torch.Tensor], list[int]]


class CodePredictor(nn.Module):
    def __init__(self, args: CodePredictorArgs, talker_hidden: int) -> None:
        super().__init__()
        self.args = args
        self.model = CodePredictorModel(args, talker_hidden)
        self.lm_head = nn.ModuleList(
            [nn.Linear(args.hidden_size, args.vocab_size, bias=False) for _ in range(args.num_code_groups - 1)])
        self.small_to_mtp_projection: nn.Module = (
            nn.Linear(talker_hidden, args.hidden_size, bias=True) if args.hidden_size != talker_hidden
            else nn.Identity())

    def predict(self, past_hidden: torch.Tensor, code0_embeds: torch.Tensor, choose: CodeChooser) -> torch.Tensor:
        """Codes 1..G-1 [B, G-1] of B talker steps: past_hidden and code0_embeds are [B, talker hidden]."""
        args = self.args
        groups, b = args.num_code_groups, past_hidden.shape[0]
        assert args.num_key_value_heads is not None and args.head_dim is not None
        # One block of `groups` slots per request: the sub-sequence is at most G long (2 + G-2 fed-back codes).
        shape = (2, b, groups, args.num_key_value_heads, args.head_dim)
        caches = [torch.zeros(shape, dtype=past_hidden.dtype, device=past_hidden.device)
                  for _ in self.model.layers]
        tables = torch.arange(b, device=past_hidden.device)[:, None]
        x = torch.stack([past_hidden, code0_embeds], dim=1).flatten(0, 1)  # [2B, H]
        positions = torch.arange(2, device=x.device).repeat(b)
        slots = (tables * groups + torch.arange(2, device=x.device)).flatten()
        batch = AttentionBatch([2] * b, [2] * b, slot_mapping=slots, block_tables=tables, block_size=groups)
        hidden = self.model.run(self.small_to_mtp_projection(x), positions, batch, caches)[1::2]
        codes = []
        for g in range(1, groups):
            chosen = choose(g, self.lm_head[g - 1](hidden))
            codes.append(chosen)
            if g == groups - 1:
                break
            ids = torch.tensor(chosen, dtype=torch.long, device=x.device)
            x = self.small_to_mtp_projection(self.model.codec_embedding[g - 1](ids))
            length = g + 2
            positions = torch.full((b,), length - 1, dtype=torch.long, device=x.device)
            batch = AttentionBatch([1] * b, [length] * b, slot_mapping=tables[:, 0] * groups + length - 1,
                                   block_tables=tables, block_size=groups)
            hidden = self.model.run(x, positions, batch, caches)
        return torch.tensor(codes, dtype=torch.long, device=x.device).T


class Talker(nn.Module):
    def __init__(self, args: TalkerArgs) -> None:
        super().__init__()
        self.args = args
        self.model = TalkerModel(args)
        self.text_projection = ResizeMLP(args.text_hidden_size, args.text_hidden_size, args.hidden_size)
        self.codec_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.code_predictor = CodePredictor(args.code_predictor, args.hidden_size)

    def text_embeds(self, ids: list[int]) -> torch.Tensor:
        device = self.codec_head.weight.device
        return self.text_projection(self.model.text_embedding(torch.tensor(ids, dtype=torch.long, device=device)))

    def codec_embeds(self, ids: list[int]) -> torch.Tensor:
        device = self.codec_head.weight.device
        return self.model.codec_embedding(torch.tensor(ids, dtype=torch.long, device=device))

    def frame_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the G code embeddings of frames [N, G] -> [N, H]: the talker's input for those frames."""
        out = self.model.codec_embedding(codes[:, 0])
        for g in range(1, codes.shape[1]):
            out = out + self.code_predictor.model.codec_embedding[g - 1](codes[:, g])
        return out

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[torch.Tensor] | None) -> torch.Tensor:
        return self.model.run(embeds, positions, batch, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.codec_head(hidden)

    def kv_cache_spec(self) -> KVCacheSpec:
        a = self.args
        assert a.num_key_value_heads is not None and a.head_dim is not None
        return KVCacheSpec(a.num_hidden_layers, a.num_key_value_heads, a.head_dim)

    def suppressed_codes(self) -> list[int]:
        """The talker never emits the top 1024 ids (specials, languages, speakers) except codec EOS."""
        a = self.args
        return [i for i in range(a.vocab_size - 1024, a.vocab_size) if i != a.codec_eos_token_id]


class Qwen3TTSForConditionalGeneration(nn.Module):
    args_class: ClassVar[type[Qwen3TTSArgs]] = Qwen3TTSArgs

    def __init__(self, args: Qwen3TTSArgs) -> None:
        super().__init__()
        self.args = args
        self.talker = Talker(args.talker)
        self.speaker_encoder = SpeakerEncoder(args.speaker_encoder) if args.speaker_encoder is not None else None
        self.ignored_checkpoint_patterns: tuple[str, ...] = ()

    def kv_cache_spec(self) -> KVCacheSpec:
        return self.talker.kv_cache_spec()

    # --- prompts ----------------------------------------------------------------------------------------

    def special_text_embeds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tts_bos, tts_eos and tts_pad as talker inputs [H] each."""
        a = self.args
        bos, eos, pad = self.talker.text_embeds([a.tts_bos_token_id, a.tts_eos_token_id, a.tts_pad_token_id])
        return bos, eos, pad

    def language_id(self, language: str, speaker: str | None) -> int | None:
        t = self.args.talker
        lang = (language or "auto").lower()
        if lang != "auto" and lang not in t.codec_language_id:
            raise RequestError(f"unknown language '{language}' (this model knows: {', '.join(self.args.languages)})")
        language_id = None if lang == "auto" else t.codec_language_id[lang]
        if lang in ("chinese", "auto") and speaker and t.spk_is_dialect.get(speaker.lower()):
            language_id = t.codec_language_id[t.spk_is_dialect[speaker.lower()]]  # dialect speakers
        return language_id

    @torch.inference_mode()
    def build_prompt(self, text_ids: list[int], language: str = "auto", speaker: str | None = None,
                     speaker_embedding: torch.Tensor | None = None, instruct_ids: list[int] | None = None,
                     ref_ids: list[int] | None = None, ref_codes: torch.Tensor | None = None,
                     non_streaming_text: bool = False) -> "SpeechPrompt":
        """The talker inputs of one request. text_ids are the wrapped text
        "<|im_start|>assistant\\n{text}<|im_end|>\\n<|im_start|>assistant\\n" (3 role ids, text, 5 tail ids);
        ref_ids wrap the reference transcript as "<|im_start|>assistant\\n{ref}<|im_end|>\\n"."""
        t, talker = self.args.talker, self.talker
        if len(text_ids) < 9:
            raise RequestError("the text to speak is empty")
        bos, eos, pad = self.special_text_embeds()
        if speaker_embedding is not None:
            speaker_embed: torch.Tensor | None = speaker_embedding.to(bos.dtype).to(bos.device)
        elif speaker:
            if speaker.lower() not in t.spk_id:
                raise RequestError(f"unknown voice '{speaker}'")
            speaker_embed = talker.codec_embeds([t.spk_id[speaker.lower()]])[0]
        else:
            speaker_embed = None
        language_id = self.language_id(language, speaker if speaker_embedding is None else None)
        think = ([t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id] if language_id is None else
                 [t.codec_think_id, t.codec_think_bos_id, language_id, t.codec_think_eos_id])
        codec = [talker.codec_embeds(think)]
        if speaker_embed is not None:
            codec.append(speaker_embed[None])
        codec.append(talker.codec_embeds([t.codec_pad_id, t.codec_bos_id]))
        codec_prefix = torch.cat(codec)
        parts = []
        if instruct_ids:
            parts.append(talker.text_embeds(instruct_ids))
        parts.append(talker.text_embeds(text_ids[:3]))
        n = codec_prefix.shape[0]
        parts.append(torch.cat([pad.expand(n - 2, -1), bos[None]]) + codec_prefix[:-1])
        text = text_ids[3:-5]
        if ref_codes is not None:
            if ref_ids is None:
                raise RequestError("cloning from reference audio needs its transcript")
            icl, trailing = self._icl_prompt(text, ref_ids[3:-2], ref_codes, eos, pad, non_streaming_text)
            parts.append(icl)
        elif non_streaming_text:
            whole = torch.cat([talker.text_embeds(text), eos[None]])
            parts.append(whole + talker.codec_embeds([t.codec_pad_id] * whole.shape[0]))
            parts.append(pad[None] + talker.codec_embeds([t.codec_bos_id]))
            trailing = pad[None]
        else:
            parts.append(talker.text_embeds(text[:1]) + codec_prefix[-1:])
            trailing = torch.cat([talker.text_embeds(text[1:]), eos[None]]) if len(text) > 1 else eos[None]
        return SpeechPrompt(torch.cat(parts), trailing, pad)

    def _icl_prompt(self, text: list[int], ref: list[int], ref_codes: torch.Tensor, eos: torch.Tensor,
                    pad: torch.Tensor, non_streaming_text: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t, talker = self.args.talker, self.talker
        text_embed = torch.cat([talker.text_embeds(ref + text), eos[None]])
        codes = ref_codes.to(self.talker.codec_head.weight.device).long()
        codec_embed = torch.cat([talker.codec_embeds([t.codec_bos_id]), talker.frame_embeds(codes)])
        n_text, n_codec = text_embed.shape[0], codec_embed.shape[0]
        if non_streaming_text:
            icl = text_embed + talker.codec_embeds([t.codec_pad_id] * n_text)
            return torch.cat([icl, codec_embed + pad]), pad[None]
        if n_text > n_codec:
            return text_embed[:n_codec] + codec_embed, text_embed[n_codec:]
        return torch.cat([text_embed, pad.expand(n_codec - n_text, -1)]) + codec_embed, pad[None]

    def suppressed_codes(self) -> list[int]:
        return self.talker.suppressed_codes()


@dataclass
class SpeechPrompt:
    """Talker inputs of one request: the prefill rows, the text rows fed one per decode step (then pad)."""

    prefill: torch.Tensor  # [L, H]
    trailing: torch.Tensor  # [N, H]
    pad: torch.Tensor  # [H]

    def step_text(self, step: int) -> torch.Tensor:
        return self.trailing[step] if step < self.trailing.shape[0] else self.pad

    def positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n)
