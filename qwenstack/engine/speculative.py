"""Speculative decoding (EngineConfig.speculative_tokens = k > 0): drafts from Qwen3-Next's multi-token-prediction
head (speculative_method "mtp"), or from the sequence's own tokens (prompt lookup, "ngram", any model).

One engine step for a decoding sequence whose last token t_L is not yet in the cache, with drafts d_1..d_k
from the previous step:

  verify   the main model runs [t_L, d_1..d_k] in ONE pass (query length k+1; the drafts' KV lands in the
           sequence's blocks like any token). Row j's logits are the target distribution p_j of the token
           after d_j (after t_L for j = 0).
  accept   greedy: while d_{j+1} == argmax p_j, then p_a's argmax. Sampling: the standard rule (Leviathan et
           al. 2023; Chen et al. 2023): accept d_{j+1} with probability min(1, p_j(d)/q_j(d)); on rejection
           draw from normalize(max(0, p_j - q_j)) and stop; when all k are accepted draw a bonus token from
           p_k. Every emitted token is then distributed exactly as without speculation. p and q are the
           sampler's own distributions (penalties, min_tokens, temperature, top-k/top-p/min-p applied with
           the drafts so far counted as output).
  roll back the KV of rejected positions needs nothing: num_computed_tokens advances by 1 + accepted, and
           those slots are overwritten later. The linear-attention state must end exactly at the accepted
           length, so the verify pass runs with the model's state journal (RecurrentStateModel.
           make_state_journal; qwenstack.models.state_journal): the drafting sequences' slots stay untouched
           during the pass, each linear layer records the per-token inputs of the delta rule, and
           commit(1 + accepted) replays the recurrent form from the untouched state over the kept tokens
           only. Chosen over keeping every per-token state (k+1 copies of a 2 MB-per-layer state for the
           80B) and over snapshot-and-rerun-the-model (a second main pass).
  draft    the MTP head catches up on the positions the main model just kept: at position j it reads
           (h_j, t_{j+1}) and writes its own KV there (prefill chunks too, so its cache covers the prompt).
           Its output at the last kept position gives d'_1 (argmax for greedy sequences, sampled from q
           otherwise); d'_2..d'_k come from feeding its own hidden state and draft back, one token per pass.
           The drafts wait in seq.extras until the next step verifies them.
  blocks   are the scheduler's: its lookahead (SchedulerConfig.num_lookahead_tokens = k) gives each sampling
           sequence blocks for the drafts it verifies and the ones drafted after them, and grants each decode
           how many drafts it may verify (ScheduledBatch.num_lookahead_tokens). This runner never allocates;
           it drafts only as far as the sequence's blocks reach.

Prompt lookup ("ngram", vLLM's method of that name, llama.cpp's lookup decoding): the drafts are the k tokens
that followed the most recent earlier occurrence of the sequence's last n tokens (n from prompt_lookup_max down
to prompt_lookup_min), in its prompt or its output: free to make, and right wherever the answer quotes what
came before (code edits, extraction, summaries that cite). A draft is a point mass, q = one-hot(d), so the rule
above accepts d with probability p(d) and draws a rejection from p without d. Nothing is drafted when no n-gram
matches, or when the step ran more than prompt_lookup_max_batch sequences: on two CPU cores, 0.6B bf16, lookup
gained 1.06-1.15x at 4 sequences decoding together and cost 0.91-0.99x at 16, where the verify rows of every
sequence make the step compute-bound. A sequence whose lookups keep missing backs off (_note_lookup). A model
without recurrent state verifies as one-token decode rows (ModelRunner.prepare's rows_as_decodes), on the
decode fast paths, where each weight is read once for all rows:
on the 0.6B shape in bfloat16 a verify of 5 tokens cost 1.1-1.4 decode steps (benchmarks/bench_lookup.py), so
each accepted draft is most of a free token.

Sequences with logits processors (structured output, thinking budgets) keep their processors' state in
step with the emitted tokens, so they decode without drafts. Drafts are capped by the step's token budget
(max_num_batched_tokens, through the scheduler's grant) and by max_tokens. With a seed, a run is
reproducible, but its tokens differ from a run without speculation (the same distribution, another draw).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenstack.engine.runner import ModelRunner, StepResult, sample_request
from qwenstack.engine.sampler import (
    SampleRequest, apply_penalties, filter_logits, rows_logprobs, sequence_generator,
)
from qwenstack.engine.scheduler import ScheduledBatch
from qwenstack.engine.sequence import PositionLogprobs, Sequence
from qwenstack.models.base import CausalLM, RecurrentStateJournal

DRAFT_KEY = "spec_draft"  # seq.extras entry holding the pending drafts
LOOKUP_BACKOFF_KEY = "spec_lookup_backoff"  # seq.extras: (verifies in a row that accepted nothing, steps to skip)
MAX_LOOKUP_SKIP = 32  # steps a sequence whose lookups keep missing goes without drafting, at most
SPECULATIVE_METHODS = ("mtp", "ngram")


@dataclass
class Draft:
    at: int  # seq.num_tokens the drafts continue from: they are tokens at, at + 1, ...
    tokens: list[int]
    probs: list[torch.Tensor] | None  # q rows [V] each token was sampled from; None: greedy, or point masses


@dataclass
class _Drafting:
    """A sequence drafting at the end of this step."""

    seq: Sequence
    new: list[int]  # its tokens emitted this step (not yet appended by the engine)
    want: int  # drafts to make
    position: int  # where the first chained pass runs: the position after the last kept one
    row: int  # the head's output row at the last kept position
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens verified by the main model
    accepted: int = 0  # of which accepted
    verify_passes: int = 0  # sequence-steps that verified at least one draft

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def mtp_head(model: CausalLM) -> "torch.nn.Module":
    head = getattr(model, "mtp", None)
    if head is None:
        raise ValueError("speculative_tokens > 0 needs the model's multi-token-prediction head: load the model "
                         "with speculation on (qwenstack.llm.load(..., speculative=True) or "
                         "qwenstack.models.qwen3_next_mtp.load_mtp_head)")
    return head


def speculative_pool_blocks(model: CausalLM, memory_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    """KV blocks in the budget when every block also holds the MTP layer's keys and values."""
    per_token = model.kv_cache_spec().bytes_per_token(dtype) + mtp_head(model).kv_cache_spec().bytes_per_token(dtype)
    return max(0, memory_bytes // max(per_token * block_size, 1))


def prompt_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens of `tokens`, for the
    longest n from max_n down to min_n that occurs; [] when none does. The search is bytes.rfind over the ids
    as 4-byte integers (C speed; a hit off a 4-byte boundary is skipped)."""
    length = len(tokens)
    data = array("i", tokens).tobytes()
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        needle = data[-4 * n:]
        end = 4 * (length - 1)  # the occurrence must end before the last token: something follows it
        while True:
            at = data.rfind(needle, 0, end)
            if at < 0:
                break
            if at % 4 == 0:
                start = at // 4 + n
                return tokens[start: start + k]
            end = at + len(needle) - 1  # misaligned: look further left
    return []


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    # Exponential race, as the sampler does; noise drawn on the generator's device.
    noise = torch.empty(probs.shape, device=generator.device).exponential_(1.0, generator=generator)
    return int((probs / noise.to(probs.device)).argmax())


class SpeculativeRunner(ModelRunner):
    """ModelRunner.execute plus drafts: verify, accept, roll the state back, draft the next ones."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, *, speculative_tokens: int,
                 method: str = "mtp", prompt_lookup_min: int = 2, prompt_lookup_max: int = 4,
                 prompt_lookup_max_batch: int | None = None, **options: Any) -> None:
        if speculative_tokens < 1:
            raise ValueError(f"speculative_tokens must be >= 1 for a SpeculativeRunner, got {speculative_tokens}")
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"prompt lookup needs 1 <= min <= max, got {prompt_lookup_min} and {prompt_lookup_max}")
        self.method = method
        self.head = mtp_head(model) if method == "mtp" else None
        super().__init__(model, num_blocks, block_size, **options)  # seed, num_state_slots, ...
        self.mtp_kv: torch.Tensor | None = None
        if self.head is not None:
            if not self.has_state:
                raise ValueError("MTP speculation is implemented for Qwen3-Next (a model with recurrent state)")
            spec = self.head.kv_cache_spec()
            shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
            self.mtp_kv = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.k = speculative_tokens
        self.lookup = (prompt_lookup_min, prompt_lookup_max)
        self.lookup_max_batch = prompt_lookup_max_batch
        self.stats = SpeculativeStats()

    def kv_cache_bytes(self) -> int:
        extra = 0 if self.mtp_kv is None else self.mtp_kv.numel() * self.mtp_kv.element_size()
        return super().kv_cache_bytes() + extra

    # --- one step -----------------------------------------------------------------------------------

    def _drafts_to_verify(self, step: ScheduledBatch) -> list[list[int]]:
        """Each sequence's pending drafts, cut to what the scheduler granted (its blocks and budget cover them)."""
        grants = step.num_lookahead_tokens or [0] * len(step.seqs)
        out = []
        for seq, n, granted in zip(step.seqs, step.num_new_tokens, grants):
            draft = seq.extras.pop(DRAFT_KEY, None)
            take = 0
            if draft is not None and draft.at == seq.num_tokens and seq.num_computed_tokens + n == seq.num_tokens \
                    and n == 1:
                take = max(0, min(len(draft.tokens), granted, seq.max_tokens - len(seq.output_token_ids) - 1))
                if take:
                    seq.extras[DRAFT_KEY] = Draft(draft.at, draft.tokens[:take],
                                                  None if draft.probs is None else draft.probs[:take])
            out.append(draft.tokens[:take] if take else [])
        return out

    @torch.inference_mode()
    def execute(self, step: ScheduledBatch) -> StepResult:
        drafts = self._drafts_to_verify(step)
        # A decode step of a model without recurrent state verifies its drafts as one-token rows: the decode
        # fast paths instead of a prefill pass (a verify of 5 tokens cost 1.47 decode steps that way, 0.6B bf16).
        as_decodes = any(drafts) and not self.has_state and all(n == 1 for n in step.num_new_tokens)
        inputs = self.prepare(step, drafts, rows_as_decodes=as_decodes)
        row_starts, prompt_rows = inputs.row_starts, inputs.prompt_rows
        query_lens = [n + len(d) for n, d in zip(step.num_new_tokens, drafts)]
        deferred = [i for i, d in enumerate(drafts) if d]
        journal: RecurrentStateJournal | None = None
        kwargs = {}
        if deferred and self.has_state:  # recurrent state must end at the accepted length; KV needs nothing
            journal = self.model.make_state_journal(deferred)  # type: ignore[attr-defined]  # has_state: checked
            kwargs["state_journal"] = journal
        hidden = self.forward(step, inputs, **kwargs)
        dev = self.device

        # Logit rows: every verified row of a drafting sequence, the last row of others that reach their end.
        sample_idx = [i for i, (s, n) in enumerate(zip(step.seqs, step.num_new_tokens))
                      if s.num_computed_tokens + n == s.num_tokens]
        logit_rows: list[int] = []
        for i in sample_idx:
            logit_rows.extend(range(row_starts[i] + query_lens[i] - 1 - len(drafts[i]), row_starts[i] + query_lens[i]))
        logit_rows += [r for _, r, _ in prompt_rows]
        result = StepResult({}, {})
        logits = None
        if logit_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)]).float()
        new_tokens: dict[int, list[int]] = {}
        argmax = logits.argmax(-1).tolist() if logits is not None else []  # one sync for every greedy row
        at = 0
        plain = []  # (batch index, logits row) of sequences sampled the ordinary way
        for i in sample_idx:
            seq, d = step.seqs[i], drafts[i]
            assert logits is not None
            if d:
                emitted = self._verify(seq, d, logits[at : at + len(d) + 1], argmax[at : at + len(d) + 1])
                *accepted, last = emitted
                result.accepted[seq.seq_id] = accepted
                result.sampled[seq.seq_id] = last
                if self.head is None:
                    self._note_lookup(seq, len(accepted))
                new_tokens[i] = [t for t, _ in emitted]
                self.stats.drafted += len(d)
                self.stats.accepted += len(accepted)
                self.stats.verify_passes += 1
            else:
                plain.append((i, at))
            at += len(d) + 1
        if plain:
            seqs = [step.seqs[i] for i, _ in plain]
            tokens = self.sample_rows(seqs, logits[[r for _, r in plain]],  # type: ignore[index]
                                      [sample_request(s) for s in seqs], result)
            for (i, _), t in zip(plain, tokens):
                if step.seqs[i].request_id not in result.failed:  # a failed row's -1 is no token to draft from
                    new_tokens[i] = [t]
        if prompt_rows:
            assert logits is not None
            self.add_prompt_logprobs(prompt_rows, logits[at:], result)
        kept = [n + (len(new_tokens.get(i, [])) - 1 if drafts[i] else 0)
                for i, n in enumerate(step.num_new_tokens)]
        if journal is not None:
            journal.commit([kept[i] for i in deferred])
        if self.head is None:
            self._propose_lookup(step, new_tokens)
        else:
            self._propose(step, hidden, row_starts, kept, new_tokens)
        return result

    # --- acceptance ---------------------------------------------------------------------------------

    @staticmethod
    def _is_plain(request: SampleRequest) -> bool:
        """Nothing to apply before the choice: a greedy row's token is its raw argmax."""
        return not request.block_eos and not request.params.needs_penalties

    def _greedy(self, row: torch.Tensor, request: SampleRequest, argmax: int) -> int:
        return argmax if self._is_plain(request) else int(self._processed(row, request).argmax())

    @staticmethod
    def _processed(row: torch.Tensor, request: SampleRequest) -> torch.Tensor:
        """sample_row's pipeline up to the choice (no logits processors: such sequences never draft)."""
        logits = row.clone()
        if request.block_eos:
            logits[request.block_eos] = float("-inf")
        if request.params.needs_penalties:
            logits = apply_penalties(logits, request.params, request.prompt_token_ids, request.output_token_ids)
        return logits

    def _distribution(self, row: torch.Tensor, request: SampleRequest) -> torch.Tensor:
        return filter_logits(self._processed(row, request), request.params).softmax(-1)

    def _verify(self, seq: Sequence, drafts: list[int], logits: torch.Tensor,
                argmax: list[int]) -> list[tuple[int, PositionLogprobs | None]]:
        """logits [k+1, V]: row j is the target after drafts[:j] (argmax[j] its raw argmax). Returns the
        emitted tokens (at least one)."""
        draft: Draft = seq.extras.pop(DRAFT_KEY)
        greedy = seq.params.greedy
        generator = sequence_generator(seq) or self.generator
        chosen: list[int] = []
        for j in range(len(drafts) + 1):
            request = sample_request(seq, drafts[:j])
            if greedy:
                target = self._greedy(logits[j], request, argmax[j])
                if j < len(drafts) and drafts[j] == target:
                    chosen.append(target)
                    continue
                chosen.append(target)
                break
            p = self._distribution(logits[j], request)
            if j == len(drafts):  # every draft accepted: the bonus token
                chosen.append(_draw(p, generator))
                break
            d = drafts[j]
            if draft.probs is None:  # a point mass (prompt lookup): q(d) = 1, and p - q is p without d
                q_d, residual = 1.0, p.clone()
                residual[d] = 0
            else:
                q = draft.probs[j].to(p.device)
                q_d, residual = float(q[d]), (p - q).clamp_min(0)
            if _uniform(generator) * q_d < float(p[d]):
                chosen.append(d)
                continue
            chosen.append(_draw(residual if float(residual.sum()) > 0 else p, generator))
            break
        top = seq.params.logprobs
        if top is None:
            return [(t, None) for t in chosen]
        return list(zip(chosen, rows_logprobs(logits[:len(chosen)], chosen, [top] * len(chosen))))

    # --- drafting -----------------------------------------------------------------------------------

    def _wanted(self, seq: Sequence, new: list[int]) -> int:
        """Drafts worth making after `new`: k, or fewer where max_tokens ends sooner (the last token is sampled)."""
        return min(self.k, seq.max_tokens - len(seq.output_token_ids) - len(new) - 1)

    @staticmethod
    def _note_lookup(seq: Sequence, accepted: int) -> None:
        """Back-off: after two verifies in a row that accept nothing, skip drafting 4, 8, ... (at most
        MAX_LOOKUP_SKIP) steps, so a sequence whose text repeats without being repeated pays for few verifies."""
        misses, _ = seq.extras.get(LOOKUP_BACKOFF_KEY, (0, 0))
        misses = 0 if accepted else misses + 1
        seq.extras[LOOKUP_BACKOFF_KEY] = (misses, min(2 ** misses, MAX_LOOKUP_SKIP) if misses >= 2 else 0)

    def _propose_lookup(self, step: ScheduledBatch, new_tokens: dict[int, list[int]]) -> None:
        """Prompt-lookup drafts for each sequence that sampled, unless the step ran more sequences than
        lookup_max_batch (then their verify rows would make the steps compute-bound: no drafts)."""
        if self.lookup_max_batch is not None and len(step.seqs) > self.lookup_max_batch:
            return
        for i, new in new_tokens.items():
            seq = step.seqs[i]
            if seq.params.logits_processors:
                continue
            misses, skip = seq.extras.get(LOOKUP_BACKOFF_KEY, (0, 0))
            if skip:
                seq.extras[LOOKUP_BACKOFF_KEY] = (misses, skip - 1)
                continue
            want = self._wanted(seq, new)  # the next step verifies what its blocks hold (_drafts_to_verify)
            tokens = prompt_lookup(seq.all_token_ids + new, want, *self.lookup) if want > 0 else []
            if tokens:
                seq.extras[DRAFT_KEY] = Draft(seq.num_tokens + len(new), tokens, None)

    def _propose(self, step: ScheduledBatch, hidden: torch.Tensor, row_starts: list[int], kept: list[int],
                 new_tokens: dict[int, list[int]]) -> None:
        """MTP catch-up over the kept positions of every sequence, then drafts for those that sampled."""
        members = [i for i, s in enumerate(step.seqs) if not s.params.logits_processors]
        if not members:
            return
        dev = self.device
        ids, positions, slots, rows, qlens, clens = [], [], [], [], [], []
        for i in members:
            seq, start = step.seqs[i], step.seqs[i].num_computed_tokens
            future = seq.all_token_ids + new_tokens.get(i, [])
            ids.extend(future[start + 1 : start + kept[i] + 1])
            positions.extend(range(start, start + kept[i]))
            slots.extend(self._slots(seq, start, start + kept[i]))
            rows.extend(range(row_starts[i], row_starts[i] + kept[i]))
            qlens.append(kept[i])
            clens.append(start + kept[i])
        seqs = [step.seqs[i] for i in members]
        batch = self.attention_batch(seqs, qlens, clens, slots)
        out = self.head(self.model.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=dev)),  # type: ignore[attr-defined]
                        hidden[torch.tensor(rows, device=dev)], torch.tensor(positions, dtype=torch.long, device=dev),
                        batch, self.mtp_kv)
        # Sequences that sampled draft, as far as the blocks the scheduler gave them reach: chained pass r
        # writes the head's KV at position num_tokens + r - 2, for r = 1 .. want - 1.
        drafting: list[_Drafting] = []
        last_row = 0
        for j, i in enumerate(members):
            last_row += qlens[j]
            seq = step.seqs[i]
            if i not in new_tokens:
                continue
            new = new_tokens[i]
            room = len(seq.block_table) * self.block_size - (seq.num_tokens + len(new)) + 2  # the head's KV
            want = min(self._wanted(seq, new), room)
            if want > 0:
                drafting.append(_Drafting(seq, new, want, clens[j], last_row - 1))
        if not drafting:
            return
        h = out[torch.tensor([d.row for d in drafting], device=dev)]  # [D, H]: row r of h is active[r]
        active = list(range(len(drafting)))
        for r in range(max(d.want for d in drafting)):
            if r > 0:  # chained: the head's own hidden state and last draft, one position further
                keep = [n for n, a in enumerate(active) if drafting[a].want > r]
                active = [active[n] for n in keep]
                seqs = [drafting[a].seq for a in active]
                pos = [drafting[a].position + r - 1 for a in active]
                batch = self.attention_batch(seqs, [1] * len(active), [p + 1 for p in pos],
                                    [self._slots(s, p, p + 1)[0] for s, p in zip(seqs, pos)])
                prev = torch.tensor([drafting[a].tokens[-1] for a in active], dtype=torch.long, device=dev)
                h = self.head(self.model.model.embed_tokens(prev), h[keep],  # type: ignore[attr-defined]
                              torch.tensor(pos, dtype=torch.long, device=dev), batch, self.mtp_kv)
            logits = self.model.compute_logits(h).float()
            for row_logits, a, top in zip(logits, active, logits.argmax(-1).tolist()):
                d = drafting[a]
                request = sample_request(d.seq, d.new + d.tokens)
                if d.seq.params.greedy:
                    d.tokens.append(self._greedy(row_logits, request, top))
                else:
                    q = self._distribution(row_logits, request)
                    d.tokens.append(_draw(q, sequence_generator(d.seq) or self.generator))
                    d.probs.append(q)
        for d in drafting:
            d.seq.extras[DRAFT_KEY] = Draft(d.seq.num_tokens + len(d.new), d.tokens,
                                            None if d.seq.params.greedy else d.probs)


__all__ = ["SpeculativeRunner", "SpeculativeStats", "speculative_pool_blocks", "prompt_lookup", "Draft"]
