"""Turns a batch of logits rows into next tokens, one row per sequence, each with its own parameters.

Decisions:
- Penalties, temperature, top-k, top-p and min-p are applied per row in float32 (a row is one
  sequence's distribution; with top-k, only its k candidates are filtered and drawn from; with top-p alone,
  only the most likely tokens when they hold the mass); greedy rows skip all of it, and greedy rows with
  nothing to apply (no penalty, processor or min_tokens mask) share one batched argmax. Sampled rows
  without logits processors share their softmax and top-k across the batch (sample_drawn_rows): the
  vocabulary is 152K wide, and a 64-row step paid each of them 64 times.
- Top-k rows (Qwen3's generation_config: top_k 20) take their candidates in one native pass over the logits
  as the model gave them (kernels.top_k_rows; no float32 copy when nothing writes into the rows), greedy rows
  the same op with k 1: 64 rows of 152K bfloat16 logits in 5.0 ms against 23 (Qwen3's defaults) and 2.1
  against 5.1 (greedy).
- A sampled row draws one uniform and takes the token at that point of its distribution's running sum
  (inverse transform, draw_rows), where an exponential race drew one uniform per token of the vocabulary.
  Temperature-only rows do it in one native call over the logits as they are (kernels.softmax_draw_rows), and
  top-p / min-p rows take their log mass the same way (kernels.logsumexp_rows): no float32 copy or scaled
  temporaries of 152K values a row unless masks or penalties write into the rows (64 rows: 1.6x and 1.3-1.7x).
- A seeded sequence draws from its own torch.Generator, so the same seed gives the same tokens whatever
  else is in the batch. Unseeded rows draw from the engine's generator.
- Logprobs are those of the model's distribution (log-softmax of the raw logits), as vLLM reports by
  default; the rank of the chosen token is included for OpenAI's format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwenstack import kernels
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.sequence import Logprob, PositionLogprobs, Sequence
from qwenstack.errors import RequestError


def sequence_generator(seq: Sequence) -> torch.Generator | None:
    """A seeded sequence's own generator, made at its first sample and kept on the sequence for its lifetime
    (preemption included), so its draws do not depend on what else is in the batch; None when unseeded."""
    if seq.generator is None and seq.params.seed is not None:
        seq.generator = torch.Generator().manual_seed(seq.params.seed)
    return seq.generator


@dataclass
class SampleRequest:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    block_eos: list[int]  # eos ids to mask while fewer than min_tokens are generated


class SampleError(Exception):
    """Sampling row `row` failed (its logits processor raised); the other rows are not at fault."""

    def __init__(self, row: int, cause: Exception) -> None:
        super().__init__(f"sampling row {row} failed: {cause}")
        self.row = row
        self.cause = cause


class RequestFailed(Exception):
    """Some requests' sampling failed (request id -> cause): they are ended, and the step is kept for the others,
    whose tokens are `outputs`. The step is never run again: a hybrid model's forward has already advanced
    every sequence's recurrent state in place, and a second pass would feed it the step's tokens twice."""

    def __init__(self, failures: dict[str, Exception], outputs: list[Any]) -> None:
        super().__init__("; ".join(f"request {rid} failed: {cause}" for rid, cause in failures.items()))
        self.failures = failures
        self.outputs = outputs


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        ids, counts = torch.tensor(output, dtype=torch.long, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (-inf outside)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, request: SampleRequest, default_generator: torch.Generator) -> int:
    params = request.params
    for processor in params.logits_processors:
        logits = processor(request.output_token_ids, logits)
    if params.logits_processors and logits.max() == float("-inf"):
        # The request's own constraints exclude every token (allowed_token_ids against a grammar, say): its
        # error to hear, where a draw from no mass would have been an arbitrary token or a crash.
        raise RequestError("no token can be generated: the request's constraints (allowed_token_ids, bad_words, "
                           "logit_bias, its grammar or tool choice) together exclude every token here")
    if request.block_eos:
        kept = logits[request.block_eos].clone()
        logits[request.block_eos] = float("-inf")
        if logits.max() == float("-inf"):  # a grammar that can only end now outranks min_tokens
            logits[request.block_eos] = kept
    if params.needs_penalties:
        logits = apply_penalties(logits, params, request.prompt_token_ids, request.output_token_ids)
    if params.greedy:
        return int(logits.argmax())
    candidates = None
    if 0 < params.top_k < logits.numel():
        # Outside the top k every probability is 0: filter and draw among those k values only, instead of
        # sorting and normalising the whole vocabulary (Qwen3's recommended top_k is 20 of 151,936).
        logits, candidates = torch.topk(logits, params.top_k)
    probs = filter_logits(logits, params).softmax(-1)
    # The draw sample_drawn_rows makes for a row (rows with logits processors come here, one at a time).
    uniform = row_uniforms([request.generator], default_generator)
    choice = int(draw_rows(probs[None], uniform)[0])
    return choice if candidates is None else int(candidates[choice])


# draw_rows finds a row's block of this many tokens first, then the token inside it.
DRAW_BLOCK = 1024


def draw_rows(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of `weights` [R, V] (unnormalised probabilities, >= 0, each row with some mass), drawn
    by inverse transform: the first index whose running sum exceeds u x the row's total, u ~ U[0, 1) from
    `uniforms` [R] (float64). One uniform a row, where the exponential race drew one per token: 152K uniforms
    from one serial generator were most of a sampled row's cost. Over a wide row the running sum is taken over
    blocks of DRAW_BLOCK tokens, then inside the chosen block (in float64): a float64 cumsum of 152K values a
    row had cost more than the softmax."""
    rows, width = weights.shape
    if width <= DRAW_BLOCK:
        cdf = weights.cumsum(-1, dtype=torch.float64)
        return torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0].clamp_max_(width - 1)
    full = width // DRAW_BLOCK * DRAW_BLOCK
    # The blocks' sums in the weights' own precision (a float64 sum of 152K float32 values first converted them
    # all): off by ~1e-7 of a block's mass, the precision of the weights themselves.
    sums = weights[:, :full].reshape(rows, -1, DRAW_BLOCK).sum(-1)
    if full < width:
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True)], dim=1)
    sums = sums.to(torch.float64)
    cdf = sums.cumsum(-1)
    targets = uniforms * cdf[:, -1]
    blocks = torch.searchsorted(cdf, targets[:, None], right=True)[:, 0].clamp_max_(sums.shape[1] - 1)
    remaining = (targets - cdf.gather(1, blocks[:, None])[:, 0] + sums.gather(1, blocks[:, None])[:, 0]).tolist()
    tokens = []
    for row, (block, left) in enumerate(zip(blocks.tolist(), remaining)):
        start = block * DRAW_BLOCK
        inside = weights[row, start:start + DRAW_BLOCK].cumsum(0, dtype=torch.float64)
        # Rounding can put `left` a hair outside the block's own sum: 0 takes its first token with weight, past
        # the end its last one.
        index = int(torch.searchsorted(inside, torch.tensor([max(left, 0.0)], dtype=torch.float64), right=True))
        if index >= inside.numel():
            index = int(torch.searchsorted(inside, inside[-1:], right=False))
        tokens.append(start + index)
    return torch.tensor(tokens)


def row_uniforms(generators: list[torch.Generator | None], default_generator: torch.Generator) -> torch.Tensor:
    """One U[0, 1) float64 per row: a seeded row's from its own generator (so its draw does not depend on the
    batch), the unseeded rows' in one draw from the engine's generator."""
    uniforms = torch.empty(len(generators), dtype=torch.float64)
    unseeded = [n for n, g in enumerate(generators) if g is None]
    if unseeded:
        uniforms[unseeded] = torch.rand(len(unseeded), generator=default_generator, dtype=torch.float64)
    for n, generator in enumerate(generators):
        if generator is not None:
            uniforms[n] = torch.rand(1, generator=generator, dtype=torch.float64)
    return uniforms


# Top-p without top-k: how many of the most likely tokens are taken before the whole vocabulary is sorted, in
# two tries: most nuclei of a trained model are a few dozen tokens, and torch.topk of 64 of 152K took 1.6 ms
# for 16 rows where 1,024 took 5.5 (kernels.top_k_rows, which takes them now: ~0.5 and ~1.7 ms).
NUCLEUS_TRIES = (64, 1024)
NUCLEUS_CANDIDATES = NUCLEUS_TRIES[-1]


def nucleus(logits: torch.Tensor, params: list[SamplingParams], candidates: int = NUCLEUS_CANDIDATES,
            log_total: torch.Tensor | None = None, temperatures: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Top-p and min-p (filter_logits') for rows of logits [R, V] over their temperatures [R, 1] (None: the
    logits are already scaled), without sorting 152K values a row (50 ms): the weights of each row's
    `candidates` most likely tokens (its probabilities, zero outside the nucleus), their ids, and whether those
    candidates hold the row's nucleus: every token after them is dropped when the candidates' mass reaches
    top_p (the mass before it does) or when the last candidate is already under min_p x the first (so is every
    later one). When not, the row needs more candidates, or to be filtered whole (filter_logits). log_total:
    the rows' logsumexp of the scaled logits [R, 1], when known."""
    best, ids = kernels.top_k_rows(logits, candidates)  # in order (the same over any positive temperature)
    if temperatures is not None:
        best = best / temperatures
    if log_total is None:
        t = torch.ones(logits.shape[0]) if temperatures is None else temperatures[:, 0]
        log_total = kernels.logsumexp_rows(logits, t)[:, None]
    probs = (best - log_total).exp()  # the full distribution's probabilities
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    held = ((probs.sum(-1) >= top_p + 1e-4) | (probs[:, -1] < min_p * probs[:, 0])).tolist()
    return _nucleus_weights(probs, params), ids, held


ARGMAX_CHUNK = 8192


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The index of each row's maximum (the first, on ties: torch's argmax). On CPU the native top-k with k 1
    (64 rows of 152K bfloat16 logits in ~2 ms against 5 for the two stages below); else in
    two stages: the maximum of each chunk of ARGMAX_CHUNK columns, then an argmax inside the first chunk holding
    the row's maximum. On CPU torch's argmax over whole 152K-column rows runs about ten times slower than its
    max (12 ms for 64 rows here, against 1 ms), a cost every greedy decode step of a large batch paid."""
    b, v = logits.shape
    if logits.device.type == "cpu" and kernels.native_op("top_k_rows") is not None:
        return kernels.top_k_rows(logits, 1)[1][:, 0].tolist()  # the first maximum on ties
    if v <= 2 * ARGMAX_CHUNK:
        return logits.argmax(-1).tolist()
    full = v // ARGMAX_CHUNK * ARGMAX_CHUNK
    maxima = logits[:, :full].reshape(b, -1, ARGMAX_CHUNK).amax(-1)
    if full < v:
        maxima = torch.cat([maxima, logits[:, full:].amax(-1, keepdim=True)], dim=1)
    tokens = []
    for row, chunk in zip(logits, maxima.argmax(-1).tolist()):
        start = chunk * ARGMAX_CHUNK
        tokens.append(start + int(row[start:start + ARGMAX_CHUNK].argmax()))
    return tokens


# Sampled rows are taken this many at a time. Each float32 temporary of a batch (the copy, the softmax, the
# uniforms) is rows x 152K x 4 bytes: at 64 rows 39 MB, above glibc's largest mmap threshold (32 MB), so each
# was a fresh mapping whose ~9,500 pages faulted in on first touch: a 64-row float32 copy took 12.7 ms, one of
# 48 rows 1.4 ms (same minute, 2 cores). 16 rows (9.7 MB) stay in reused heap memory.
DRAWN_CHUNK_ROWS = 16


def sample_drawn_rows(logits: torch.Tensor, requests: list[SampleRequest], rows: list[int],
                      default_generator: torch.Generator) -> dict[int, int]:
    """Tokens of the sampled rows without logits processors, drawn from the distribution sample_row's filters
    give (temperature, top-k, top-p, min-p over the masked and penalised logits), with the work shared across
    the rows: one softmax, top-k and draw for the batch where 64 rows had paid 64 over 152K logits. Each row
    draws one uniform (row_uniforms: its own generator when seeded, so its token does not depend on the batch)
    and takes the token at that point of its distribution (draw_rows). Top-k rows draw among their k
    candidates, top-p and min-p rows among their most likely tokens where those hold the nucleus."""
    vocab = logits.shape[1]
    params = [requests[i].params for i in rows]
    uniforms = row_uniforms([requests[i].generator for i in rows], default_generator)
    whole, top_k, other = [], [], []
    for j, p in enumerate(params):
        if 0 < p.top_k < vocab:
            top_k.append(j)
        elif p.top_p >= 1.0 and p.min_p <= 0.0:
            whole.append(j)
        else:
            other.append(j)
    rewritten = any(requests[i].block_eos or requests[i].params.needs_penalties for i in rows)
    # The rows as the model gave them (a view where they are consecutive: no float32 copy of 152K values a row),
    # or a float32 copy where masks and penalties write into some of them, as sample_row's do.
    values = _logit_rows(logits, rows)
    if rewritten:
        values = values.to(torch.float32, copy=True)
        for j, i in enumerate(rows):
            request = requests[i]
            if request.block_eos:
                values[j, request.block_eos] = float("-inf")
            if request.params.needs_penalties:
                apply_penalties(values[j], request.params, request.prompt_token_ids, request.output_token_ids)
    chosen: dict[int, int] = {}
    if whole:
        chosen.update(_draw_whole_rows(values, whole, rows, params, uniforms))
    if top_k:
        chosen.update(_draw_top_k_rows(values, top_k, rows, params, uniforms))
    if other:
        chosen.update(_draw_nucleus_rows(values, other, rows, params, uniforms))
    return chosen


def _draw_whole_rows(values: torch.Tensor, group: list[int], rows: list[int], params: list[SamplingParams],
                     uniforms: torch.Tensor) -> dict[int, int]:
    """Temperature-only rows: one draw each from the softmax of the whole row, in the native pass
    (kernels.softmax_draw_rows: no float32 copy, no temporaries of 152K values a row); the torch path where it
    does not apply, or for a row it declines (a NaN, no finite logit)."""
    temperatures = _temperatures(group, params)
    drawn = kernels.softmax_draw_rows(_rows(values, group), temperatures[:, 0], uniforms[group])
    picks = [-1] * len(group) if drawn is None else drawn.tolist()
    left = [n for n, token in enumerate(picks) if token < 0]
    if left:
        declined = [group[n] for n in left]
        scaled = _rows(values, declined).float() / temperatures[left]
        weights = scaled.sub_(scaled.amax(-1, keepdim=True)).exp_()
        for n, token in zip(left, draw_rows(weights, uniforms[declined]).tolist()):
            picks[n] = token
    return dict(zip((rows[j] for j in group), picks))


def _draw_top_k_rows(values: torch.Tensor, group: list[int], rows: list[int], params: list[SamplingParams],
                     uniforms: torch.Tensor) -> dict[int, int]:
    """The top-k rows' tokens: each row's k most likely (kernels.top_k_rows, in order), over its temperature,
    top-p and min-p among them, one draw a row."""
    best, ids = kernels.top_k_rows(_rows(values, group), max(params[j].top_k for j in group))
    k = torch.tensor([params[j].top_k for j in group])
    scaled = (best / _temperatures(group, params)).masked_fill_(torch.arange(best.shape[1]) >= k[:, None],
                                                                float("-inf"))
    weights = _nucleus_weights(scaled.softmax(-1), [params[j] for j in group])
    picks = ids.gather(1, draw_rows(weights, uniforms[group])[:, None])[:, 0]
    return dict(zip((rows[j] for j in group), picks.tolist()))


def _logit_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows `rows` of logits: a view where they are consecutive (the usual chunk of a batch), else a copy."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0]:rows[0] + len(rows)]
    return logits[rows]


def _temperatures(group: list[int], params: list[SamplingParams]) -> torch.Tensor:
    return torch.tensor([params[j].temperature for j in group], dtype=torch.float32)[:, None]


def _rows(values: torch.Tensor, group: list[int]) -> torch.Tensor:
    """The group's rows of values: values itself when the group is every row (indexing would copy 9.7 MB)."""
    return values if len(group) == values.shape[0] else values[group]


def _nucleus_weights(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filter_logits' top-p and min-p over rows of probabilities sorted in descending order, zero outside:
    top-p drops a token once the mass before it reaches top_p (the first token always stays), min-p a token
    under min_p x the first one's probability (a ratio, so the same before or after top-p renormalises)."""
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype)[:, None]
    drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype)[:, None]
        drop |= probs < min_p * probs[:, :1]
    return probs.masked_fill(drop, 0.0)


def _draw_nucleus_rows(values: torch.Tensor, group: list[int], rows: list[int], params: list[SamplingParams],
                       uniforms: torch.Tensor) -> dict[int, int]:
    """Top-p / min-p rows without top-k: among their most likely tokens where those hold the row's nucleus
    (nucleus(), with each of NUCLEUS_TRIES in turn), else over the whole row (filter_logits). The candidates come
    from the logits as they are, and the rows' log mass from one native pass (kernels.logsumexp_rows): no scaled
    float32 copy of the rows."""
    chosen: dict[int, int] = {}
    if values.shape[1] > NUCLEUS_TRIES[0]:
        source = _rows(values, group)
        temperatures = _temperatures(group, params)
        log_total = kernels.logsumexp_rows(source, temperatures[:, 0])[:, None]  # once, for every try
        position = {j: n for n, j in enumerate(group)}  # each row's row in source
        for candidates in NUCLEUS_TRIES:
            if not group or values.shape[1] <= candidates:
                break
            at = [position[j] for j in group]
            weights, ids, held = nucleus(_rows(source, at), [params[j] for j in group], candidates, log_total[at],
                                         temperatures[at])
            fits = [m for m in range(len(group)) if held[m]]
            if fits:
                picks = ids[fits].gather(1, draw_rows(weights[fits], uniforms[[group[m] for m in fits]])[:, None])
                chosen.update(zip((rows[group[m]] for m in fits), picks[:, 0].tolist()))
            group = [j for m, j in enumerate(group) if not held[m]]
    for j in group:
        weights = filter_logits(values[j].float(), params[j]).softmax(-1)[None]
        chosen[rows[j]] = int(draw_rows(weights, uniforms[j:j + 1])[0])
    return chosen


def is_plain_greedy(request: SampleRequest) -> bool:
    params = request.params
    return params.greedy and not request.block_eos and not params.needs_penalties and not params.logits_processors


def rows_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[PositionLogprobs]:
    """Each row's chosen token's logprob and rank (1 = most likely), plus its `top` most likely tokens, for rows
    of logits [R, V] and their tokens, DRAWN_CHUNK_ROWS rows at a time: one log-softmax, rank count and topk a
    chunk, where each row had paid its own over 152K values (32 ms of a
    64-row step asking for logprobs), and a long prompt's prompt logprobs a float32 copy of every row at once."""
    out: list[PositionLogprobs] = []
    for start in range(0, len(tokens), DRAWN_CHUNK_ROWS):
        end = min(start + DRAWN_CHUNK_ROWS, len(tokens))
        log_probs = torch.log_softmax(logits[start:end].float(), -1)
        chosen = log_probs.gather(1, torch.tensor(tokens[start:end])[:, None])
        ranks = (torch.count_nonzero(log_probs > chosen, dim=-1) + 1).tolist()
        most = max(tops[start:end])
        values, ids = torch.topk(log_probs, most) if most > 0 else (None, None)
        for n, (token, value, rank) in enumerate(zip(tokens[start:end], chosen[:, 0].tolist(), ranks)):
            entry: PositionLogprobs = {token: Logprob(value, rank)}
            top = tops[start + n]
            if top > 0:
                for r, (v, i) in enumerate(zip(values[n, :top].tolist(), ids[n, :top].tolist()), start=1):
                    entry.setdefault(i, Logprob(v, r))
            out.append(entry)
    return out


def sample(
    logits: torch.Tensor, requests: list[SampleRequest], default_generator: torch.Generator,
    failures: dict[int, Exception] | None = None,
) -> tuple[list[int], list[PositionLogprobs | None]]:
    """logits [B, V], in the model's dtype or float32 -> one token per row, and its logprobs where asked. A row
    whose request's processor fails raises SampleError, or with `failures` is recorded there (row -> cause)
    with token -1 and no logprobs, the other rows sampled as they would be."""
    # Plain greedy rows (nothing rewrites their logits) take one batched argmax in the logits' own dtype
    # (converting to float32 changes no order); the others are sampled row by row on a float32 copy, since
    # masks and penalties write into it.
    plain = [i for i, r in enumerate(requests) if is_plain_greedy(r)]
    chosen: dict[int, int] = {}
    if plain:
        rows = logits if len(plain) == len(requests) else logits[plain]
        chosen = dict(zip(plain, argmax_rows(rows)))
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy and not r.params.logits_processors]
    for start in range(0, len(drawn), DRAWN_CHUNK_ROWS):
        chosen.update(sample_drawn_rows(logits, requests, drawn[start:start + DRAWN_CHUNK_ROWS], default_generator))
    tokens = []
    for i, (row, request) in enumerate(zip(logits, requests)):
        if i in chosen:
            token = chosen[i]
        else:
            try:
                token = sample_row(row.to(torch.float32, copy=True), request, default_generator)
            except Exception as exc:  # a request's own logits processor failed: name the row, not the batch
                if failures is None:
                    raise SampleError(i, exc) from exc
                failures[i], token = exc, -1
        tokens.append(token)
    logprobs: list[PositionLogprobs | None] = [None] * len(requests)
    asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None and i not in (failures or {})]
    if asked:
        rows = logits if len(asked) == len(requests) else logits[asked]
        found = rows_logprobs(rows, [tokens[i] for i in asked], [requests[i].params.logprobs for i in asked])
        for i, entry in zip(asked, found):
            logprobs[i] = entry
    return tokens, logprobs
