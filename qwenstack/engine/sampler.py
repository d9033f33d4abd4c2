"""Turns a batch of logits rows into next tokens, one row per sequence, each with its own parameters.

Decisions:
- Penalties, temperature, top-k, top-p and min-p are applied per row in float32 (a row is one
  sequence's distribution; with top-k, only its k candidates are filtered and drawn from; with top-p alone,
  only the most likely tokens when they hold the mass); greedy rows skip all of it, and greedy rows with
  nothing to apply (no penalty, processor or min_tokens mask) share one batched argmax. Sampled rows
  without logits processors share their softmax, top-k and argmax across the batch (sample_drawn_rows):
  the vocabulary is 152K wide, and a 64-row step paid each of them 64 times.
- A seeded sequence draws from its own torch.Generator, so the same seed gives the same tokens whatever
  else is in the batch. Unseeded rows draw from the engine's generator.
- Logprobs are those of the model's distribution (log-softmax of the raw logits), as vLLM reports by
  default; the rank of the chosen token is included for OpenAI's format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenstack.engine.params import SamplingParams
from qwenstack.engine.sequence import Logprob, PositionLogprobs, Sequence


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
    """One request's sampling failed: the engine step is abandoned (no state was advanced) so it can be run
    again without that request; the others lose nothing but the time of the step."""

    def __init__(self, request_id: str, cause: Exception) -> None:
        super().__init__(f"request {request_id} failed: {cause}")
        self.request_id = request_id
        self.cause = cause


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
    if request.block_eos:
        logits[request.block_eos] = float("-inf")
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
    generator = request.generator or default_generator
    # Exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) samples from p. (Rows with logits
    # processors come here, one at a time; the others take sample_drawn_rows' batched path.)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = int((probs / noise).argmax())
    return choice if candidates is None else int(candidates[choice])


def race(probs: torch.Tensor, generator: torch.Generator) -> int:
    """The exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) samples from p. E is drawn as
    -log(U): torch's exponential_ took 7 ms per 152K-token row here, five times uniform draws and a log,
    and a 64-row sampled decode step paid it 64 times."""
    return int((probs / torch.rand(probs.shape, generator=generator).log_().neg_()).argmax())


# Top-p without top-k: how many of the most likely tokens are taken before the whole vocabulary is sorted.
NUCLEUS_CANDIDATES = 1024


def nucleus(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities to race over, their token ids or None for the whole row) under temperature, top-p and
    min-p, as filter_logits computes them. Sorting 152K logits for top-p took 50 ms a row: when the
    NUCLEUS_CANDIDATES most likely tokens already hold the top_p mass, every token after them is dropped
    (the mass before it reaches top_p), so only they are sorted (topk returns them in order)."""
    scaled = logits / params.temperature
    values, ids = torch.topk(scaled, NUCLEUS_CANDIDATES)
    return nucleus_of(logits, params, values, ids, scaled.logsumexp(-1))


def nucleus_of(logits: torch.Tensor, params: SamplingParams, values: torch.Tensor, ids: torch.Tensor,
               log_total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nucleus() from the row's NUCLEUS_CANDIDATES largest scaled logits (in order) and the logsumexp of
    the whole scaled row, which the batch computes for all its rows at once."""
    probs = (values - log_total).exp()  # the full distribution's probabilities, in order
    before = probs.cumsum(-1) - probs
    if float(before[-1] + probs[-1]) < params.top_p + 1e-4:  # the nucleus may reach further: sort it all
        return filter_logits(logits, params).softmax(-1), None
    keep = before < params.top_p
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs[0]
    return torch.where(keep, probs, 0.0), ids


ARGMAX_CHUNK = 8192


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The index of each row's maximum (the first, on ties: torch's argmax), in two stages: the maximum of
    each chunk of ARGMAX_CHUNK columns, then an argmax inside the first chunk holding the row's maximum.
    On CPU torch's argmax over whole 152K-column rows runs about ten times slower than its max (12 ms for
    64 rows here, against 1 ms), a cost every greedy decode step of a large batch paid."""
    b, v = logits.shape
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


def sample_drawn_rows(logits: torch.Tensor, requests: list[SampleRequest], rows: list[int],
                      default_generator: torch.Generator) -> dict[int, int]:
    """Tokens of the sampled rows without logits processors, the work shared across rows where it can be:
    a row's draw is the one sample_row makes (its own generator when seeded, so batch-independent), but a
    64-row step no longer pays 64 softmaxes, top-ks and argmaxes over 152K logits one after another.
    Rows drawing from the whole vocabulary race in one batch; top-k rows share one topk; top-p and min-p
    rows without top-k take sample_row's path (their nucleus)."""
    values = logits[rows].to(torch.float32, copy=True)
    vocab = values.shape[1]
    for j, i in enumerate(rows):  # masks and penalties write into the row, as sample_row's do
        request = requests[i]
        if request.block_eos:
            values[j, request.block_eos] = float("-inf")
        if request.params.needs_penalties:
            apply_penalties(values[j], request.params, request.prompt_token_ids, request.output_token_ids)
    whole, top_k, other = [], [], []
    for j, i in enumerate(rows):
        params = requests[i].params
        if 0 < params.top_k < vocab:
            top_k.append(j)
        elif params.top_p >= 1.0 and params.min_p <= 0.0:
            whole.append(j)
        else:
            other.append(j)
    chosen: dict[int, int] = {}
    if whole:
        temperature = torch.tensor([requests[rows[j]].params.temperature for j in whole], dtype=torch.float32)
        probs = (values[whole] / temperature[:, None]).softmax(-1)
        # Each row's uniforms from its own generator (the unseeded ones in one draw from the engine's), then
        # one log over them all: a log per row was not spread over the threads and cost 2 ms a row.
        uniform = torch.empty_like(probs)
        unseeded = [n for n, j in enumerate(whole) if requests[rows[j]].generator is None]
        if unseeded:
            uniform[unseeded] = torch.rand(len(unseeded), vocab, generator=default_generator)
        for n, j in enumerate(whole):
            generator = requests[rows[j]].generator
            if generator is not None:
                torch.rand(vocab, generator=generator, out=uniform[n])
        chosen.update(zip((rows[j] for j in whole), argmax_rows(probs.div_(uniform.log_().neg_()))))
    if top_k:
        most = max(requests[rows[j]].params.top_k for j in top_k)
        best, ids = torch.topk(values[top_k], most)
        for n, j in enumerate(top_k):
            request = requests[rows[j]]
            k = request.params.top_k
            probs = filter_logits(best[n, :k], request.params).softmax(-1)
            chosen[rows[j]] = int(ids[n, race(probs, request.generator or default_generator)])
    if other and vocab > NUCLEUS_CANDIDATES:
        temperature = torch.tensor([requests[rows[j]].params.temperature for j in other], dtype=torch.float32)
        scaled = values[other] / temperature[:, None]
        best, ids = torch.topk(scaled, NUCLEUS_CANDIDATES)
        log_totals = scaled.logsumexp(-1)
        del scaled
    for n, j in enumerate(other):
        request = requests[rows[j]]
        if vocab > NUCLEUS_CANDIDATES:
            probs, candidates = nucleus_of(values[j], request.params, best[n], ids[n], log_totals[n])
        else:
            probs, candidates = filter_logits(values[j], request.params).softmax(-1), None
        choice = race(probs, request.generator or default_generator)
        chosen[rows[j]] = choice if candidates is None else int(candidates[choice])
    return chosen


def is_plain_greedy(request: SampleRequest) -> bool:
    params = request.params
    return params.greedy and not request.block_eos and not params.needs_penalties and not params.logits_processors


def token_logprobs(log_probs: torch.Tensor, token: int, top: int) -> PositionLogprobs:
    """The chosen token's logprob and rank, plus the `top` most likely tokens, for one position."""
    chosen = float(log_probs[token])
    rank = int((log_probs > log_probs[token]).sum()) + 1
    out: PositionLogprobs = {token: Logprob(chosen, rank)}
    if top > 0:
        values, ids = torch.topk(log_probs, top)
        for r, (v, i) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(i, Logprob(v, r))
    return out


def sample(
    logits: torch.Tensor, requests: list[SampleRequest], default_generator: torch.Generator
) -> tuple[list[int], list[PositionLogprobs | None]]:
    """logits [B, V], in the model's dtype or float32 -> one token per row, and its logprobs where asked."""
    # Plain greedy rows (nothing rewrites their logits) take one batched argmax in the logits' own dtype
    # (converting to float32 changes no order); the others are sampled row by row on a float32 copy, since
    # masks and penalties write into it.
    plain = [i for i, r in enumerate(requests) if is_plain_greedy(r)]
    chosen: dict[int, int] = {}
    if plain:
        rows = logits if len(plain) == len(requests) else logits[plain]
        chosen = dict(zip(plain, argmax_rows(rows)))
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy and not r.params.logits_processors]
    if drawn:
        chosen.update(sample_drawn_rows(logits, requests, drawn, default_generator))
    tokens, logprobs = [], []
    for i, (row, request) in enumerate(zip(logits, requests)):
        if i in chosen:
            token = chosen[i]
        else:
            try:
                token = sample_row(row.to(torch.float32, copy=True), request, default_generator)
            except Exception as exc:  # a request's own logits processor failed: name the row, not the batch
                raise SampleError(i, exc) from exc
        tokens.append(token)
        if request.params.logprobs is not None:
            logprobs.append(token_logprobs(torch.log_softmax(row.float(), -1), token, request.params.logprobs))
        else:
            logprobs.append(None)
    return tokens, logprobs
