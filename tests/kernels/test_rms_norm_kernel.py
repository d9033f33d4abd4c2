"""The native RMSNorm (qwenstack/kernels/rms_norm_cpu.cpp) against the torch reference of
models/layers.RMSNorm: bit-identical in bfloat16 and float16 (both round the same float32 values; float32
stays on the torch path); plain and zero-centered weights, 2-D to 4-D inputs, strided q/k head views,
and the cases that must stay on the torch path (autograd, mixed dtypes)."""
from __future__ import annotations

import pytest
import torch

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.models.fast_paths import NativeRMSNorm, prepare_for_cpu
from qwenstack.models.layers import RMSNorm


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def make_norm(dim: int, dtype: torch.dtype, zero_centered: bool) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6, zero_centered=zero_centered).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim) * 0.1 + (0.0 if zero_centered else 1.0))
    return norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("shape", [(1, 128), (7, 128), (3, 4, 128), (2, 3, 5, 128), (5, 36)])
def test_matches_reference(dtype: torch.dtype, zero_centered: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(len(shape) * 100 + shape[-1])
    norm = make_norm(shape[-1], dtype, zero_centered)
    x = (torch.randn(shape) * 3).to(dtype)
    with torch.inference_mode():
        got = kernels.rms_norm(x, norm.weight, norm.eps, zero_centered)
        want = norm(x)  # models/layers.RMSNorm is the torch reference
    assert got is not None and got.shape == x.shape and got.dtype == dtype
    # The float32 sums differ only in order; after rounding to 8 or 11 bits that almost never shows.
    assert (got != want).float().mean().item() <= 0.01
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_strided_head_view() -> None:
    """q_norm/k_norm see [T, heads, head_dim] views into the fused qkv output."""
    qkv = torch.randn(5, 3 * 2 * 64).to(torch.bfloat16)
    q = qkv[:, 128:256].view(5, 2, 64)
    assert not q.is_contiguous()
    norm = make_norm(64, torch.bfloat16, False)
    native = NativeRMSNorm(64, norm.eps)
    native.weight = norm.weight
    with torch.inference_mode():
        got = native(q)
        want = norm(q)
    assert torch.equal(got, want)


def test_torch_path_where_the_kernel_does_not_apply() -> None:
    norm = make_norm(32, torch.float32, False)
    x = torch.randn(3, 32, requires_grad=True)
    assert kernels.rms_norm(x, norm.weight, 1e-6, False) is None  # autograd needs the torch ops
    norm(x).sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        assert kernels.rms_norm(torch.randn(3, 32).to(torch.bfloat16), norm.weight, 1e-6, False) is None
        assert kernels.rms_norm(torch.randn(3, 32), norm.weight, 1e-6, False) is None  # float32: torch's sums


# --- QK-norm and rotary embedding in one call (qk_norm_rope) ---------------------------------------------

def rotary_tables(positions: int, rotary_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.arange(positions)[:, None].float() * (10000.0 ** (-torch.arange(0, rotary_dim, 2) / rotary_dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # full, and partial rotary (channels past it pass through)
@pytest.mark.parametrize("gated", [False, True])  # Qwen3-Next: q heads interleaved with gate heads
def test_qk_norm_rope_is_the_norm_then_the_rotation(dtype: torch.dtype, zero_centered: bool, rotary_dim: int,
                                                     gated: bool) -> None:
    """Bit for bit the norm kernel's output rotated by the torch rotary code (same arithmetic, one call)."""
    from qwenstack.models.layers import apply_rotary

    torch.manual_seed(rotary_dim + 7 * gated)
    tokens, heads, kv_heads, dim = 6, 4, 2, 64
    q_width = (2 if gated else 1) * heads * dim
    qkv = (torch.randn(tokens, q_width + 2 * kv_heads * dim) * 2).to(dtype)
    if gated:
        q = qkv[:, :q_width].view(tokens, heads, 2 * dim)[..., :dim]
    else:
        q = qkv[:, :q_width].view(tokens, heads, dim)
    k = qkv[:, q_width:q_width + kv_heads * dim].view(tokens, kv_heads, dim)
    q_norm, k_norm = make_norm(dim, dtype, zero_centered), make_norm(dim, dtype, zero_centered)
    cos, sin = rotary_tables(tokens, rotary_dim, dtype)
    with torch.inference_mode():
        fused = kernels.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, cos, sin, 1e-6, zero_centered)
        q_want = apply_rotary(kernels.rms_norm(q, q_norm.weight, 1e-6, zero_centered), cos, sin)
        k_want = apply_rotary(kernels.rms_norm(k, k_norm.weight, 1e-6, zero_centered), cos, sin)
    assert fused is not None
    assert fused[0].shape == (tokens, heads, dim) and fused[1].shape == (tokens, kv_heads, dim)
    assert torch.equal(fused[0], q_want) and torch.equal(fused[1], k_want)


def test_attention_layer_fused_path_matches_its_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention layer's norm_and_rotate once the preparation swapped its ops, against the layer as built
    (torch) and against QWENSTACK_DISABLE_KERNELS (the float32 norm sums differ only in order)."""
    from qwenstack.config import RopeConfig
    from qwenstack.models.layers import Attention

    torch.manual_seed(3)
    attn = Attention(256, 4, 2, 64, 1e-6, RopeConfig.from_config({"rope_theta": 10000.0}, "qwen3")).to(torch.bfloat16)
    for norm in (attn.q_norm, attn.k_norm):
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64) * 0.1 + 1.0)
    q = (torch.randn(9, 4, 64) * 2).to(torch.bfloat16)
    k = (torch.randn(9, 2, 64) * 2).to(torch.bfloat16)
    positions = torch.arange(100, 109)
    with torch.inference_mode():
        want = attn.norm_and_rotate(q, k, positions)
        assert prepare_for_cpu(attn, linears=False).attention_layers == 1
        got = attn.norm_and_rotate(q, k, positions)
        with monkeypatch.context() as m:
            m.setattr(kernels.build, "kernels_disabled", lambda: True)
            disabled = attn.norm_and_rotate(q, k, positions)
    for g, w, d in zip(got, want, disabled):
        assert (g != w).float().mean().item() <= 0.02
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
        assert torch.equal(d, w)


def test_qk_norm_rope_leaves_float32_and_autograd_to_torch() -> None:
    cos, sin = rotary_tables(3, 32, torch.float32)
    q, k, w = torch.randn(3, 2, 32), torch.randn(3, 1, 32), torch.ones(32)
    assert kernels.qk_norm_rope(q, k, w, w, cos, sin, 1e-6, False) is None
    q16, k16, w16 = q.to(torch.bfloat16), k.to(torch.bfloat16), w.to(torch.bfloat16).requires_grad_()
    c16, s16 = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    assert kernels.qk_norm_rope(q16, k16, w16, w16, c16, s16, 1e-6, False) is None


# --- residual add and norm in one call (add_rms_norm) ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("shape", [(1, 1024), (5, 64), (2, 3, 36)])
def test_add_and_norm_matches_the_add_then_the_norm(dtype: torch.dtype, zero_centered: bool,
                                                    shape: tuple[int, ...]) -> None:
    torch.manual_seed(shape[-1] + len(shape))
    norm = make_norm(shape[-1], dtype, zero_centered)
    x, delta = (torch.randn(shape) * 2).to(dtype), torch.randn(shape).to(dtype)
    with torch.inference_mode():
        got = kernels.add_rms_norm(x, delta, norm.weight, norm.eps, zero_centered)
        total, normed = norm.add_and_norm(x, delta)  # the reference: torch's add, then the norm
    assert got is not None
    assert torch.equal(got[0], total)  # one rounding of the same float32 sum
    assert got[1].shape == normed.shape and (got[1] != normed).float().mean().item() <= 0.01
    torch.testing.assert_close(got[1].float(), normed.float(), rtol=1e-2, atol=1e-2)


def test_add_rounds_denormal_sums_as_torch_does() -> None:
    """The residual sum is rounded to bfloat16 in one conversion instruction where the CPU has it; that
    instruction reads float32 denormals as zero, so vectors holding one must round as torch does (kept, not
    flushed), next to vectors of ordinary values in the same row."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.randn(3, 64).to(torch.bfloat16)
    delta = torch.randn(3, 64).to(torch.bfloat16)
    x[0, :16] = torch.tensor([tiny * f for f in torch.linspace(-0.9, 0.9, 16).tolist()]).to(torch.bfloat16)
    delta[0, :16] = torch.tensor([tiny * 0.03 * (i % 5) for i in range(16)]).to(torch.bfloat16)
    x[1, 20] = tiny / 4  # one denormal lane among normal ones
    assert (x[0, :16].float().abs() < tiny).all() and x[0, :16].ne(0).any()
    norm = make_norm(64, torch.bfloat16, False)
    with torch.inference_mode():
        got = kernels.add_rms_norm(x, delta, norm.weight, norm.eps, False)
    assert got is not None
    want = x + delta
    assert torch.equal(got[0].view(torch.int16), want.view(torch.int16))  # bit for bit, denormals and signs
    assert got[0][0, :16].ne(0).any()  # not flushed to zero


def test_prepared_norm_adds_and_normalises_strided_rows() -> None:
    """The residual stream may be a strided view (a row slice of a larger buffer)."""
    norm = make_norm(64, torch.bfloat16, False)
    native = NativeRMSNorm(64, norm.eps)
    native.weight = norm.weight
    buffer = torch.randn(4, 128).to(torch.bfloat16)
    x, delta = buffer[:, :64], buffer[:, 64:]
    assert not x.is_contiguous()
    with torch.inference_mode():
        got = native.add_and_norm(x, delta)
        want = norm.add_and_norm(x, delta)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_add_and_norm_leaves_float32_mismatches_and_autograd_to_torch() -> None:
    norm = make_norm(32, torch.bfloat16, False)
    x16 = torch.randn(3, 32).to(torch.bfloat16)
    assert kernels.add_rms_norm(x16.float(), x16.float(), norm.weight.float(), 1e-6, False) is None  # float32
    assert kernels.add_rms_norm(x16, x16[:2], norm.weight, 1e-6, False) is None  # shapes differ
    assert kernels.add_rms_norm(x16, x16.half(), norm.weight, 1e-6, False) is None  # dtypes differ
    x = torch.randn(3, 32, requires_grad=True)
    assert kernels.add_rms_norm(x, x, norm.weight.float(), 1e-6, False) is None
