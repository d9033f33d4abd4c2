"""What quantization costs in quality, measured against the same model unquantized.

For each quantization level, on a held-out text and N prompts cut from it:
- perplexity: qwenstack.evaluation.perplexity's definition (token level, windows of context_len sharing one token,
  every token but the first predicted once), for the baseline and each level;
- mean KL divergence KL(baseline || quantized) of the next-token distribution, in nats, averaged over
  the same predicted positions (teacher-forced: both models see the text, not their own outputs);
- teacher-forced top-1 match: the fraction of those positions where both models' most likely token is the
  same;
- greedy agreement, step by step: the baseline decodes `new_tokens` greedy tokens from each of N prompts;
  then both models read each prompt with the baseline's continuation, and at each of those new_tokens steps
  we compare the token each would pick (its argmax). This is the fraction of greedy decisions the
  quantized model makes as the baseline does, on the text greedy decoding really produces.
- free-running greedy agreement: each model decodes `new_tokens` greedy tokens from each of N prompts on
  its own (no teacher forcing); agreement is the fraction of the N x new_tokens generated tokens equal to
  the baseline's token at the same position. Once a run diverges its continuation usually differs, so we
  also report the mean position of the first divergence and the fraction of prompts with no divergence.
  One flipped near-tie changes every later position, so on a small model this is mostly a measure of how
  many near-ties greedy decoding meets: on the demo model the same weights run in float32 agree with the
  bfloat16 baseline on only 84% of tokens this way (benchmarks/bench_agreement.py), less than int8 does.
  That is why the step-by-step figure is the one we bound (tests/quantization/test_quality.py).

Decisions:
- The baseline is the model in the dtype it is served in (bfloat16 by default), not float32: the
  question is what switching a running deployment to int8 changes.
- Each level is quantized from a copy of the baseline (peak memory: baseline + one quantized copy), and
  the baseline's logits are recomputed per level rather than stored: [tokens, vocab] float32 for a real
  vocabulary would be gigabytes.
- Prompts are prompt_len-token slices of the held-out stream, at evenly spaced offsets or, for chat text,
  ending on evenly chosen assistant headers (so each model answers a turn, as users see it); decoding
  ignores end-of-sequence tokens so every run yields exactly new_tokens tokens.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from qwenstack.evaluation.perplexity import window_starts
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.base import CausalLM, prompt_logits
from qwenstack.quantization import decode_weight_bytes, quantize_model


@dataclass
class LevelQuality:
    level: str  # "bfloat16" (the baseline) or a quantization method
    perplexity: float
    mean_kl: float  # nats per position, against the baseline (0 for the baseline)
    top1_match: float  # teacher-forced on the held-out text
    step_agreement: float  # teacher-forced on the baseline's greedy continuations
    token_agreement: float  # free-running greedy
    prompts_identical: float  # fraction of prompts whose greedy tokens all match the baseline's
    mean_first_divergence: float  # mean index of the first differing token (new_tokens when none differs)
    weight_bytes_per_token: int  # bytes of weights a decode step reads (qwenstack.quantization)
    summary: str = ""  # the quantization report


@dataclass
class QualityReport:
    model: str
    dtype: str
    context_len: int
    text_tokens: int  # tokens of held-out text scored
    num_prompts: int
    prompt_len: int
    new_tokens: int
    levels: list[LevelQuality] = field(default_factory=list)
    prompt_end: str | None = None  # what each prompt ends on (None: anywhere in the text)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "quality", **asdict(self)}

    def table(self) -> str:
        """A Markdown table, one row per level."""
        head = ("| level | perplexity | mean KL (nats) | top-1 match | greedy agreement, step by step "
                "| free-running agreement | identical prompts | first divergence | weights read / token |")
        rows = [head, "|" + "---|" * 9]
        for r in self.levels:
            rows.append(f"| {r.level} | {r.perplexity:.4f} | {r.mean_kl:.2e} | {r.top1_match:.2%} | "
                        f"{r.step_agreement:.2%} | {r.token_agreement:.2%} | {r.prompts_identical:.0%} "
                        f"| {r.mean_first_divergence:.1f} | {_size(r.weight_bytes_per_token)} |")
        return "\n".join(rows)

    def describe(self) -> str:
        ends = f" ending on {self.prompt_end!r}" if self.prompt_end else ""
        return (f"{self.model} ({self.dtype} baseline): perplexity and KL over {self.text_tokens:,} held-out tokens "
                f"in windows of {self.context_len}; greedy agreement over {self.num_prompts} prompts of "
                f"{self.prompt_len} tokens{ends} x {self.new_tokens} new tokens, step by step on the baseline's "
                f"continuations and free-running (each model decoding on its own)")


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


@dataclass
class _Scores:
    nll_sum: float = 0.0
    kl_sum: float = 0.0
    top1_same: int = 0
    count: int = 0


@torch.inference_mode()
def teacher_forced_scores(reference: CausalLM, other: CausalLM | None, token_ids: Sequence[int],
                          context_len: int, batch_size: int = 8) -> tuple[float, float, float, float]:
    """(reference perplexity, other perplexity, mean KL(reference || other), top-1 match) over the stream.

    With other=None only the reference is scored (its KL is 0 and top-1 match 1)."""
    device = next(reference.parameters()).device  # type: ignore[attr-defined]
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    windows = [ids[s:s + context_len] for s in window_starts(len(ids), context_len)]
    full = [w for w in windows if w.numel() == context_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in windows if w.numel() != context_len]
    ref_scores, other_scores = _Scores(), _Scores()
    for group in groups:
        batch = torch.stack(group)  # [B, S]
        targets = batch[:, 1:, None]
        ref_lp = torch.log_softmax(prompt_logits(reference, batch[:, :-1]).float(), dim=-1)  # [B, S-1, V]
        ref_scores.nll_sum += -ref_lp.gather(-1, targets).double().sum().item()
        ref_scores.count += targets.numel()
        if other is None:
            continue
        lp = torch.log_softmax(prompt_logits(other, batch[:, :-1]).float(), dim=-1)
        other_scores.nll_sum += -lp.gather(-1, targets).double().sum().item()
        other_scores.kl_sum += (ref_lp.exp() * (ref_lp - lp)).sum(-1).double().sum().item()
        other_scores.top1_same += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum().item())
        other_scores.count += targets.numel()
    ref_ppl = math.exp(ref_scores.nll_sum / ref_scores.count)
    if other is None:
        return ref_ppl, ref_ppl, 0.0, 1.0
    n = other_scores.count
    return ref_ppl, math.exp(other_scores.nll_sum / n), other_scores.kl_sum / n, other_scores.top1_same / n


def prompts_from_stream(token_ids: Sequence[int], num_prompts: int, prompt_len: int,
                        end_marker: Sequence[int] | None = None) -> list[list[int]]:
    """num_prompts slices of prompt_len tokens at evenly spaced offsets of the stream; with end_marker (token
    ids, e.g. a chat template's assistant header), slices that end right after evenly chosen occurrences of it."""
    if len(token_ids) < prompt_len + 1:
        raise ValueError(f"the text has {len(token_ids)} tokens; prompts of {prompt_len} need more")
    if end_marker:
        m = list(end_marker)
        ends = [i + len(m) for i in range(len(token_ids) - len(m) + 1)
                if list(token_ids[i:i + len(m)]) == m and i + len(m) >= prompt_len]
        if len(ends) < num_prompts:
            raise ValueError(f"the text has {len(ends)} places for a prompt to end at the marker; {num_prompts} needed")
        chosen = [ends[i * len(ends) // num_prompts] for i in range(num_prompts)]
        return [list(token_ids[e - prompt_len:e]) for e in chosen]
    span = len(token_ids) - prompt_len
    starts = [i * span // max(num_prompts, 1) for i in range(num_prompts)]
    return [list(token_ids[s:s + prompt_len]) for s in starts]


@torch.inference_mode()
def step_agreement(reference: CausalLM, other: CausalLM, prompts: list[list[int]],
                   continuations: list[list[int]], batch_size: int = 8) -> float:
    """The fraction of the continuations' steps at which both models' most likely next token is the same,
    both reading prompt + continuation (teacher-forced). Prompts of one length batch together."""
    device = next(reference.parameters()).device  # type: ignore[attr-defined]
    by_shape: dict[tuple[int, int], list[list[int]]] = {}
    for prompt, cont in zip(prompts, continuations):
        if cont:
            by_shape.setdefault((len(prompt), len(cont)), []).append(prompt + cont)
    same = total = 0
    for (prompt_len, steps), seqs in by_shape.items():
        for i in range(0, len(seqs), batch_size):
            # The logits at positions prompt_len - 1 ... prompt_len + steps - 2 choose the continuation's tokens.
            batch = torch.tensor(seqs[i:i + batch_size], dtype=torch.long, device=device)[:, :-1]
            picks = [prompt_logits(m, batch)[:, prompt_len - 1:].argmax(-1) for m in (reference, other)]
            same += int((picks[0] == picks[1]).sum().item())
            total += picks[0].numel()
    return same / max(total, 1)


def greedy_agreement(reference_tokens: list[list[int]], tokens: list[list[int]]) -> tuple[float, float, float]:
    """(fraction of tokens equal position by position, fraction of identical runs, mean first divergence)."""
    same = total = identical = 0
    first: list[int] = []
    for ref, got in zip(reference_tokens, tokens):
        n = len(ref)
        equal = [i < len(got) and got[i] == ref[i] for i in range(n)]
        same += sum(equal)
        total += n
        diverge = next((i for i, e in enumerate(equal) if not e), n)
        first.append(diverge)
        identical += diverge == n
    return same / total, identical / len(reference_tokens), sum(first) / len(first)


def evaluate_quality(
    reference: CausalLM,
    token_ids: Sequence[int],
    levels: Sequence[str],
    *,
    model_name: str = "model",
    context_len: int = 512,
    num_prompts: int = 16,
    prompt_len: int = 32,
    new_tokens: int = 64,
    keep: Sequence[str] = (),
    prompt_end: Sequence[int] | None = None,
    prompt_end_text: str | None = None,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    prepared: dict[str, tuple[CausalLM, str]] | None = None,
) -> QualityReport:
    """The quality table: the baseline row, then one row per quantization level (see the module doc).

    prompt_end: token ids each prompt ends on (prompt_end_text names them in the report). prepared: levels
    whose model is already loaded (level -> (model, summary)), e.g. a pre-quantized checkpoint in its own
    format against its exactly dequantized weights as the baseline."""
    prepared = prepared or {}
    say = progress or (lambda _: None)
    param = next(reference.parameters())  # type: ignore[attr-defined]
    dtype = str(param.dtype).replace("torch.", "")
    prompts = prompts_from_stream(token_ids, num_prompts, prompt_len, prompt_end)
    report = QualityReport(model_name, dtype, context_len, len(token_ids), num_prompts, prompt_len, new_tokens,
                           prompt_end=prompt_end_text if prompt_end else None)
    say(f"{dtype}: scoring the baseline")
    base_ppl, _, _, _ = teacher_forced_scores(reference, None, token_ids, context_len, batch_size)
    base_tokens = greedy_generate(reference, prompts, new_tokens)
    report.levels.append(LevelQuality(dtype, base_ppl, 0.0, 1.0, 1.0, 1.0, 1.0, float(new_tokens),
                                      decode_weight_bytes(reference), "baseline"))  # type: ignore[arg-type]
    for level in levels:
        if level in prepared:
            quantized, summary = prepared[level]
        else:
            say(f"{level}: quantizing a copy")
            quantized = copy.deepcopy(reference)
            summary = quantize_model(quantized, level, keep=keep).summary()  # type: ignore[arg-type]
        say(f"{level}: scoring")
        _, ppl, kl, top1 = teacher_forced_scores(reference, quantized, token_ids, context_len, batch_size)
        steps = step_agreement(reference, quantized, prompts, base_tokens, batch_size)
        agreement, identical, first = greedy_agreement(base_tokens, greedy_generate(quantized, prompts, new_tokens))
        report.levels.append(LevelQuality(level, ppl, kl, top1, steps, agreement, identical, first,
                                          decode_weight_bytes(quantized), summary))  # type: ignore[arg-type]
        del quantized
    return report
