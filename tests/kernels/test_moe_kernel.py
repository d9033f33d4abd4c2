"""Stacked MoE experts in one native call (qwenstack/kernels/linear_tiled_cpu.cpp's moe_tiled) against the loop
over experts it replaces: bit for bit the same products and activation (linear_tiled and silu_mul expert by
expert), experts with no rows, one row, and the most rows it takes; the cases it leaves to the loop; and the
form choice that puts the experts in the tile-packed form apart from the dense linears. Quantized experts
(int8, int4) in one call (decode_layer_cpu.cpp's experts_swiglu) against their loop."""
from __future__ import annotations

import pytest
import torch

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.models import cpu_linear
from qwenstack.models.moe import Experts
from qwenstack.quantization import QuantExperts
from qwenstack.quantization.formats import Int4Weight, Int8Weight

H, I = 64, 32  # tile multiples: gate_up [2I, H] and down [H, I] both tile


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def _tiled_experts(num_experts: int, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(num_experts, H, I).to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    assert experts.prepare_for_cpu("native") == 2 * num_experts and experts.tiled
    assert experts.prepare_for_cpu("native") == 0 and experts.prepare_for_cpu("packed") == 0  # prepared once
    return experts


def _loop(experts: Experts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The products expert by expert and row by row: one-row products take the vector loops on every build
    (with AMX, linear_tiled sends 3+ rows to the tiles, another summation order), and the vector loops sum
    each row alike whatever the rows a pass, so this is moe_tiled's result bit for bit."""
    out, start = [], 0
    for e, n in enumerate(counts):
        for row in x[start:start + n].split(1):
            h = kernels.linear_tiled(row, experts.gate_up_proj[e])
            out.append(kernels.linear_tiled(kernels.silu_mul(h), experts.down_proj[e]))
        start += n
    return torch.cat(out)


@pytest.fixture
def any_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """moe_tiled with no row limit, whatever this build's policy (the kernel itself has none)."""
    monkeypatch.setattr(kernels.ops, "moe_max_rows", lambda: None)


def _mixed_by_torch(experts: Experts, x: torch.Tensor, token_of: torch.Tensor, weights: torch.Tensor,
                    counts: list[int]) -> torch.Tensor:
    """Experts.mix's torch path around the loop: the gather, the products, `*= weights`, index_add_."""
    results = _loop(experts, x[token_of], counts)
    results *= weights[:, None]
    return torch.zeros_like(x).index_add_(0, token_of, results)


def _pairs(counts: list[int], tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and bfloat16 weights for sum(counts) pairs: some tokens get many pairs, some none."""
    generator = torch.Generator().manual_seed(seed)
    token_of = torch.randint(0, tokens, (sum(counts),), generator=generator)
    return token_of, torch.rand(sum(counts), generator=generator).to(torch.bfloat16)


# MOE_GROUP_ROWS (linear_tiled_cpu.cpp) is 4,096: the last case takes three groups of experts, a token's pairs in
# more than one of them, and one expert alone past the group size.
@pytest.mark.parametrize("counts", [[1, 0, 2, 3, 0, 1], [0, 0, 0, 0, 0, 5], [16, 1, 0, 7, 4, 9], [1] * 6,
                                    [40, 0, 3, 0, 0, 13], [300, 0, 17, 1, 0, 2], [1500, 2000, 0, 4500, 5, 2]])
def test_one_call_equals_the_loop_over_experts(counts: list[int], any_rows: None) -> None:
    experts = _tiled_experts(len(counts))
    tokens = max(1, sum(counts) // 3)
    x = torch.randn(tokens, H).to(torch.bfloat16)
    token_of, weights = _pairs(counts, tokens)
    with torch.inference_mode():
        got = kernels.moe_tiled(x, token_of, weights, torch.tensor(counts), experts.gate_up_proj, experts.down_proj)
        want = _mixed_by_torch(experts, x, token_of, weights, counts)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.equal(got, want)


def test_tokens_routed_nowhere_are_zero(any_rows: None) -> None:
    experts = _tiled_experts(2)
    x = torch.randn(4, H).to(torch.bfloat16)
    token_of, weights = torch.tensor([2, 0, 2]), torch.tensor([0.5, 1.0, 0.25]).to(torch.bfloat16)
    with torch.inference_mode():
        got = kernels.moe_tiled(x, token_of, weights, torch.tensor([2, 1]), experts.gate_up_proj, experts.down_proj)
        assert torch.equal(got, _mixed_by_torch(experts, x, token_of, weights, [2, 1]))
        empty = kernels.moe_tiled(x, token_of[:0], weights[:0], torch.tensor([0, 0]), experts.gate_up_proj,
                                  experts.down_proj)
    assert not got[1].any() and not got[3].any() and got[0].any() and got[2].any()
    assert empty is not None and not empty.any()


def test_the_module_takes_it_and_stays_with_its_reference() -> None:
    """Experts.forward in the tiled form (routing, weights and the scatter-add around the one call) against the
    same experts unprepared, F.linear and torch's SiLU: bfloat16 rounding apart, no more."""
    torch.manual_seed(1)
    reference = Experts(8, H, I).to(torch.bfloat16)
    with torch.no_grad():
        reference.gate_up_proj.normal_(0, 0.2)
        reference.down_proj.normal_(0, 0.2)
    prepared = Experts(8, H, I).to(torch.bfloat16)
    prepared.load_state_dict(reference.state_dict())
    prepared.prepare_for_cpu("native")
    x = torch.randn(5, H).to(torch.bfloat16)
    expert_ids = torch.stack([torch.randperm(8)[:3] for _ in range(5)])
    weights = torch.softmax(torch.randn(5, 3), -1).to(torch.bfloat16)
    calls = []
    original = kernels.moe_tiled
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "moe_tiled", lambda *a: calls.append(a) or original(*a))
        got = prepared(x, expert_ids, weights)
        want = reference(x, expert_ids, weights)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_what_it_leaves_to_the_loop_and_what_it_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = _tiled_experts(2)
    limit = 8  # a build with a limit (AMX: 16; vector loops without bfloat16 dot products: 16)
    monkeypatch.setattr(kernels.ops, "moe_max_rows", lambda: limit)
    x = torch.randn(limit + 1, H).to(torch.bfloat16)
    token_of, weights = _pairs([limit + 1, 0], limit + 1)
    stacks = (experts.gate_up_proj, experts.down_proj)
    counts = torch.tensor([limit + 1, 0])
    assert kernels.moe_tiled(x, token_of, weights, counts, *stacks) is None
    assert kernels.moe_tiled(x, token_of[:limit], weights[:limit], torch.tensor([limit, 0]), *stacks) is not None
    assert kernels.moe_tiled(x.float(), token_of, weights, counts, *stacks) is None
    with torch.inference_mode():  # the module then runs the loop over experts, with the same result
        looped = experts.mix(x, token_of, weights, counts)
    torch.testing.assert_close(looped, _mixed_by_torch(experts, x, token_of, weights, counts.tolist()), rtol=2e-2,
                               atol=2e-2)
    with pytest.raises(RuntimeError, match="counts add up to 3, token_of has 2 pairs"):
        kernels.moe_tiled(x, token_of[:2], weights[:2], torch.tensor([2, 1]), *stacks)
    with pytest.raises(RuntimeError, match="pair 1 names token 9 of 9"):
        kernels.moe_tiled(x, torch.tensor([0, limit + 1]), weights[:2], torch.tensor([2, 0]), *stacks)
    with pytest.raises(RuntimeError, match="weights must be bfloat16 \\[R\\]"):
        kernels.moe_tiled(x, token_of[:2], weights[:2].float(), torch.tensor([2, 0]), *stacks)


def test_the_row_limit_follows_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill-sized groups stay in the one call where the vector loops are the fast form (AVX512-BF16
    without AMX); with AMX the tile loop expert by expert takes them from 17 rows, and slower loops stop at 16."""
    ops = kernels.ops
    for amx, isa, limit in ((True, "avx512_amx", 16), (False, "avx512_bf16", None), (False, "avx512", 16),
                            (False, "avx2", 16)):
        monkeypatch.setattr(ops, "has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(ops, "isa_level", lambda isa=isa: isa)
        assert ops.moe_max_rows() == limit, isa


def test_experts_get_their_own_form(tiny_qwen3_moe, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense linears' vote and the experts' vote are apart: here packed for the first, native for the
    second, as on a CPU without AMX."""
    from qwenstack.models.registry import load_model

    model = load_model(tiny_qwen3_moe, dtype=torch.bfloat16)
    stacks = [m for m in model.modules() if type(m) is Experts]
    assert stacks
    timed = cpu_linear._expert_passes(model)
    assert set(timed) >= {"plain", "native"}  # the probe runs the experts' mix in each form
    for run in timed.values():
        run()
    monkeypatch.setattr(cpu_linear, "fastest_form", lambda probes, rounds=cpu_linear.FORM_ROUNDS: "packed")
    monkeypatch.setattr(cpu_linear, "fastest_expert_form", lambda model, rounds=cpu_linear.FORM_ROUNDS: "native")
    cpu_linear.prepare_cpu_linears(model)
    assert any(isinstance(m, cpu_linear.PackedLinear) for m in model.modules())
    assert all(m.tiled or m.native for m in stacks)


def _quantized_experts(method: str, num_experts: int, seed: int = 0) -> QuantExperts:
    torch.manual_seed(seed)
    experts = Experts(num_experts, H, 2 * I).to(torch.bfloat16)  # int8 tiles take K in multiples of 64
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    if method == "int8":
        return QuantExperts(experts, Int8Weight.quantize, Int8Weight.quantize)
    return QuantExperts(experts, lambda w: Int4Weight.quantize(w, 32), lambda w: Int4Weight.quantize(w, 32))


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("counts", [[1, 0, 2, 3, 0, 1], [0, 0, 0, 0, 0, 5], [40, 0, 3, 0, 0, 13]])
def test_quantized_experts_in_one_call_equal_their_loop(method: str, counts: list[int]) -> None:
    """Tile-packed int8 or int4 experts (experts_swiglu, decode_layer_cpu.cpp): bit for bit each expert's two
    products and silu_mul; the module takes the one call, and stays with its torch loop (F.silu) up to
    bfloat16 rounding."""
    # The tiled form on every build: below AVX512-BF16 / VNNI the ops run their scalar loops, slower, same sums.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, f"{method}_tiles_preferred", lambda: True)
        experts = _quantized_experts(method, len(counts))
    operands = [w.tiled_operands() for w in (experts.gate_up_proj, experts.down_proj)]
    assert None not in operands
    x = torch.randn(sum(counts), H).to(torch.bfloat16)
    counts_t = torch.tensor(counts)
    with torch.inference_mode():
        got = kernels.experts_swiglu(x, counts_t, operands[0], operands[1])
        want, start = [], 0
        for e, n in enumerate(counts):
            if n:
                h = experts.gate_up_proj.matmul(x[start:start + n], e)
                want.append(experts.down_proj.matmul(kernels.silu_mul(h), e))
            start += n
        assert got is not None and torch.equal(got, torch.cat(want))
        calls = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "experts_swiglu", lambda *a: calls.append(a) or kernels.ops.experts_swiglu(*a))
            module = experts.grouped_swiglu(x, counts_t)
        looped = Experts.grouped_swiglu(experts, x, counts_t)  # the loop over experts, F.silu(gate) * up
    assert len(calls) == 1 and torch.equal(module, got)
    torch.testing.assert_close(looped, got, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="counts add up to"):
        kernels.experts_swiglu(x[:2], torch.tensor([2] + [0] * (len(counts) - 2) + [1]), operands[0], operands[1])
    with pytest.raises(RuntimeError, match="stacks of"):
        kernels.experts_swiglu(x, counts_t[:-1], operands[0], operands[1])
