"""The sampler on synthetic logits: batched greedy rows equal per-row argmax beside sampled and penalised
rows, and top-k sampling (drawn among the k candidates only) follows the filtered distribution."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from qwenstack.engine.params import SamplingParams
from qwenstack.engine.sampler import ARGMAX_CHUNK, SampleError, SampleRequest, argmax_rows, filter_logits, sample


def request(params: SamplingParams, generator: torch.Generator | None = None) -> SampleRequest:
    return SampleRequest(params, [1, 2, 3], [4, 4], generator, [])


def test_greedy_rows_batched_beside_other_rows() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    penalised = SamplingParams(temperature=0, repetition_penalty=1.5)
    sampled = SamplingParams(temperature=0.8, seed=3)
    rows = [request(greedy), request(sampled, torch.Generator().manual_seed(3)), request(greedy),
            request(penalised), request(greedy)]
    tokens, _ = sample(logits, rows, torch.Generator().manual_seed(1))
    expected = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
    assert 0 <= tokens[1] < 300 and 0 <= tokens[3] < 300


@pytest.mark.parametrize("native", [True, False])
def test_argmax_rows_is_torch_argmax(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native one-pass argmax (top_k_rows with k 1) and the chunked one it falls back on: vocabularies with
    and without a partial last chunk, ties across and inside chunks (the first index wins, as in torch),
    bfloat16 rows (as the runner now passes them) and NaN rows."""
    from kernel_utils import require_native_kernels
    from qwenstack import kernels

    if native:
        require_native_kernels()  # a failed build fails here on x86-64 Linux rather than skipping
    else:
        monkeypatch.setattr(kernels, "native_op", lambda name: None)
    gen = torch.Generator().manual_seed(0)
    for vocab in (151936, 5 * ARGMAX_CHUNK, 3 * ARGMAX_CHUNK + 17):
        logits = torch.randn(6, vocab, generator=gen)
        logits[1, 5] = logits[1, vocab - 3] = 50.0  # a tie between the first and the last chunk
        logits[2, ARGMAX_CHUNK + 1] = logits[2, ARGMAX_CHUNK + 7] = 50.0  # a tie inside one chunk
        logits[3, vocab - 1] = 50.0  # the maximum in the (partial) last chunk
        logits[4, 100] = float("nan")
        for rows in (logits, logits.to(torch.bfloat16)):
            assert argmax_rows(rows) == rows.argmax(-1).tolist()


def test_greedy_over_bfloat16_logits_equals_float32() -> None:
    logits = (torch.randn(4, 3 * ARGMAX_CHUNK, generator=torch.Generator().manual_seed(2)) * 4).to(torch.bfloat16)
    rows = [request(SamplingParams(temperature=0, logprobs=2)) for _ in range(4)]
    tokens, logprobs = sample(logits, rows, torch.Generator().manual_seed(1))
    tokens32, logprobs32 = sample(logits.float(), rows, torch.Generator().manual_seed(1))
    assert tokens == tokens32 == logits.float().argmax(-1).tolist()
    assert logprobs == logprobs32


def test_top_k_draws_follow_the_filtered_distribution() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 2
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=11)
    want = filter_logits(logits.clone(), params).softmax(-1)  # the full-vocabulary reference
    generator = torch.Generator().manual_seed(11)
    draws = 6000
    counts = torch.zeros(1000)
    for _ in range(draws):
        token, _ = sample(logits[None], [request(params, generator)], torch.Generator())
        counts[token[0]] += 1
    assert set(counts.nonzero().flatten().tolist()) <= set(want.nonzero().flatten().tolist())
    # Each candidate's frequency within 4 standard deviations of its probability.
    p = want[want > 0]
    freq = counts[want > 0] / draws
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / draws).sqrt() + 1e-3).all()


def test_top_p_over_a_large_vocabulary_draws_from_the_same_nucleus() -> None:
    """Top-p without top-k looks at the NUCLEUS_CANDIDATES most likely tokens instead of sorting the whole
    vocabulary when they hold the mass; the distribution drawn from is filter_logits' (min-p too), and a
    flat distribution whose nucleus reaches further is said not to be held (the sampler sorts it whole)."""
    from qwenstack.engine.sampler import NUCLEUS_CANDIDATES, NUCLEUS_TRIES, nucleus

    gen = torch.Generator().manual_seed(4)
    cases = ((6.0, SamplingParams(temperature=0.7, top_p=0.8), True),
             (2.0, SamplingParams(temperature=0.8, top_p=0.7), True),  # held by 1,024 candidates, not by 64
             (6.0, SamplingParams(temperature=1.0, top_p=0.95, min_p=0.05), True),
             (6.0, SamplingParams(temperature=1.0, min_p=0.02), True),  # min-p alone
             (0.1, SamplingParams(temperature=1.0, min_p=0.02), False),  # flat: min-p keeps thousands
             (0.1, SamplingParams(temperature=1.0, top_p=0.9), False))  # flat: the nucleus reaches further
    for scale, params, held in cases:
        logits = torch.randn(20 * NUCLEUS_CANDIDATES, generator=gen) * scale
        want = filter_logits(logits.clone(), params).softmax(-1)
        weights, ids, fits = nucleus((logits / params.temperature)[None], [params])
        assert fits == [held]
        if scale == 2.0:
            assert nucleus((logits / params.temperature)[None], [params], NUCLEUS_TRIES[0])[2] == [False]
        if held:
            got = torch.zeros_like(want)
            got[ids[0]] = weights[0] / weights[0].sum()
            assert want.count_nonzero() < NUCLEUS_CANDIDATES
            assert (got > 0).equal(want > 0)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_draws_follow_each_rows_distribution(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batched path (whole vocabulary, top-k with top-p and min-p, top-p alone over a large vocabulary
    with 64 and with 1,024 candidates, min-p alone, the full-sort fallback) and the per-row path of a row with
    a logits processor draw from filter_logits' distribution: each token's frequency over many draws within 4
    standard deviations of its probability. With the native kernels (top-k, the whole-row draw, the rows' log
    mass) and with their torch fallbacks."""
    from kernel_utils import require_native_kernels
    from qwenstack import kernels
    from qwenstack.engine.sampler import NUCLEUS_CANDIDATES

    if native:
        require_native_kernels()
    else:
        monkeypatch.setattr(kernels, "native_op", lambda name: None)
        monkeypatch.setattr(kernels.ops, "native_op", lambda name: None)

    gen = torch.Generator().manual_seed(8)
    vocab = 3 * NUCLEUS_CANDIDATES
    logits = torch.randn(vocab, generator=gen) * 4
    flat = torch.randn(vocab, generator=gen) * 0.05
    wider = torch.randn(vocab, generator=torch.Generator().manual_seed(10))  # a nucleus of 64 to 1,024 tokens
    cases = [(logits, SamplingParams(temperature=1.3)),
             (logits, SamplingParams(temperature=0.6, top_k=20, top_p=0.95)),
             (logits, SamplingParams(temperature=0.9, top_k=30, min_p=0.1)),
             (logits, SamplingParams(temperature=0.8, top_p=0.7)),
             (wider, SamplingParams(temperature=0.8, top_p=0.7)),
             (logits, SamplingParams(temperature=1.0, min_p=0.05)),
             (flat, SamplingParams(temperature=1.0, top_p=0.5)),
             (logits, SamplingParams(temperature=0.8, top_p=0.9, logits_processors=[lambda _, row: row]))]
    draws = 4000
    for row_logits, params in cases:
        want = filter_logits(row_logits.clone(), params).softmax(-1)
        rows = [request(params) for _ in range(draws)]
        tokens, _ = sample(row_logits.expand(draws, vocab).contiguous(), rows, torch.Generator().manual_seed(9))
        counts = torch.bincount(torch.tensor(tokens), minlength=vocab).float()
        assert set(counts.nonzero().flatten().tolist()) <= set(want.nonzero().flatten().tolist()), params
        freq = counts / draws
        assert ((freq - want).abs() <= 4 * (want * (1 - want) / draws).sqrt() + 2e-3).all(), params


def test_a_seeded_row_draws_the_same_token_alone_or_in_a_batch() -> None:
    logits = torch.randn(6, 3 * ARGMAX_CHUNK, generator=torch.Generator().manual_seed(5)) * 3
    for params in (SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=0.8, top_p=0.9, seed=7),
                   SamplingParams(temperature=0.8, top_k=20, seed=7)):
        alone = [sample(logits[2:3], [request(params, torch.Generator().manual_seed(7))], torch.Generator())[0][0]
                 for _ in range(2)]
        others = [request(SamplingParams(temperature=1.0)) for _ in range(6)]
        others[2] = request(params, torch.Generator().manual_seed(7))
        batched = sample(logits, others, torch.Generator().manual_seed(1))[0][2]
        assert alone == [batched, batched]


def test_a_row_that_fails_is_recorded_and_the_others_draw_as_without_it() -> None:
    """With `failures`, a row whose request's processor raises gets -1 and its cause; the seeded rows beside it
    (drawn in a batch, or alone with a processor of their own) draw what they draw without it."""
    def refuse(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise ValueError("no token can be generated")

    def keep(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(2))
    batched, alone = SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, seed=4,
                                                                             logits_processors=[keep])
    rows = [request(batched, torch.Generator().manual_seed(3)), request(alone, torch.Generator().manual_seed(4)),
            request(SamplingParams(temperature=1.0, logprobs=2, logits_processors=[refuse]))]
    failures: dict[int, Exception] = {}
    tokens, logprobs = sample(logits, rows, torch.Generator(), failures)
    assert list(failures) == [2] and tokens[2] == -1 and logprobs[2] is None
    fresh = sample(logits[:2], [request(batched, torch.Generator().manual_seed(3)),
                                request(alone, torch.Generator().manual_seed(4))], torch.Generator())[0]
    assert tokens[:2] == fresh
    with pytest.raises(SampleError):  # without `failures`, the first failing row raises
        sample(logits, rows, torch.Generator())


def test_draw_rows_is_the_inverse_transform_and_never_takes_a_zero_weight() -> None:
    """Blocked draws (rows wider than DRAW_BLOCK) give the index a whole-row float64 running sum gives, and at
    the extremes of u (0, just under 1) and beside zero-weight blocks they still take a token with weight."""
    from qwenstack.engine.sampler import DRAW_BLOCK, draw_rows

    gen = torch.Generator().manual_seed(3)
    width = 5 * DRAW_BLOCK + 123
    weights = torch.rand(12, width, generator=gen) ** 8
    weights[weights < 0.2] = 0.0  # most tokens without weight
    weights[:, :DRAW_BLOCK] = 0.0  # a whole first block without weight
    weights[:, -300:] = 0.0  # and the end of the row
    weights[3] = 0.0
    weights[3, 2 * DRAW_BLOCK + 5] = 1e-30  # one token holds the whole mass
    uniforms = torch.rand(12, generator=gen, dtype=torch.float64)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 2**-53
    tokens = draw_rows(weights, uniforms)
    cdf = weights.cumsum(-1, dtype=torch.float64)
    want = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    assert tokens.tolist()[2:] == want.tolist()[2:]
    assert tokens[3] == 2 * DRAW_BLOCK + 5
    assert (weights[torch.arange(12), tokens] > 0).all()


def test_logprobs_of_many_rows_are_each_rows_own() -> None:
    """rows_logprobs (a chunk of rows at a time) gives what each row's own log-softmax gives: the chosen
    token's logprob and rank and each row's own number of top entries, across chunks and for bfloat16 rows."""
    from qwenstack.engine.sampler import DRAWN_CHUNK_ROWS, Logprob, rows_logprobs

    def token_logprobs(log_probs: torch.Tensor, token: int, top: int) -> dict[int, Logprob]:
        out = {token: Logprob(float(log_probs[token]), int((log_probs > log_probs[token]).sum()) + 1)}
        values, ids = torch.topk(log_probs, top)
        for r, (v, i) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(i, Logprob(v, r))
        return out

    gen = torch.Generator().manual_seed(6)
    rows = DRAWN_CHUNK_ROWS + 5
    logits = (torch.randn(rows, 3000, generator=gen) * 3).to(torch.bfloat16)
    tokens = torch.randint(3000, (rows,), generator=gen).tolist()
    tokens[0] = int(logits[0].float().argmax())  # rank 1
    tops = [n % 4 for n in range(rows)]  # 0 (the chosen token only) to 3
    got = rows_logprobs(logits, tokens, tops)
    for n in range(rows):
        want = token_logprobs(torch.log_softmax(logits[n].float(), -1), tokens[n], tops[n])
        assert got[n].keys() == want.keys()
        for token, entry in want.items():
            assert got[n][token].rank == entry.rank
            assert abs(got[n][token].logprob - entry.logprob) < 1e-5
    assert got[0][tokens[0]].rank == 1


def test_a_block_summed_past_its_own_running_sum_takes_its_last_token_with_weight() -> None:
    """A block's float32 sum can exceed the float64 running sum inside it (1,024 x 0.1 does): a u near 1 then
    points past the block's end, and the draw takes the block's last token with weight (this path had called a
    Tensor method torch does not have)."""
    from qwenstack.engine.sampler import DRAW_BLOCK, draw_rows

    weights = torch.full((1, 2 * DRAW_BLOCK), 0.1)
    assert weights[0, DRAW_BLOCK:].sum().item() > weights[0, DRAW_BLOCK:].double().sum().item()
    weights[0, -1] = 0.0
    assert draw_rows(weights, torch.tensor([1.0 - 2**-52], dtype=torch.float64)).tolist() == [2 * DRAW_BLOCK - 2]


def test_constraints_that_exclude_every_token_are_the_requests_error() -> None:
    """A request whose processors leave no token (allowed_token_ids against a grammar) fails with a RequestError
    naming why, greedy or sampled, instead of drawing from no mass; min_tokens yields to a grammar that can only
    end here (eos stays open when it is the one token left)."""

    from qwenstack.engine.sampler import SampleError
    from qwenstack.errors import RequestError

    def only(ids: list[int]) -> Any:
        def allow(output: list[int], logits: torch.Tensor) -> torch.Tensor:
            kept = logits[ids].clone()
            logits.fill_(float("-inf"))
            logits[ids] = kept
            return logits
        return allow

    logits = torch.randn(2, 50)
    for temperature in (0.0, 0.8):
        params = SamplingParams(temperature=temperature, logits_processors=[only([3]), only([4])])
        with pytest.raises(SampleError) as info:
            sample(logits, [request(SamplingParams()), request(params)], torch.Generator().manual_seed(0))
        assert info.value.row == 1 and isinstance(info.value.cause, RequestError)
        eos_only = SamplingParams(temperature=temperature, logits_processors=[only([7])])
        blocked = SampleRequest(eos_only, [1], [2], None, block_eos=[7])
        assert sample(logits[:1], [blocked], torch.Generator().manual_seed(0))[0] == [7]
        both = SampleRequest(SamplingParams(temperature=temperature, logits_processors=[only([7, 9])]), [1], [2],
                             None, block_eos=[7])
        assert sample(logits[:1], [both], torch.Generator().manual_seed(0))[0] == [9]  # eos still blocked
