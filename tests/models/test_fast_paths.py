"""The one preparation pass (models/fast_paths.py): a model as built runs torch's reference math and reaches no
kernel; prepare_for_cpu swaps every norm and attention layer (and the linears) once, the prepared model reaches
the native ops, decodes the same greedy tokens, and preparing again changes nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from kernel_utils import require_native_kernels, requires_bf16_kernels
from qwenstack import kernels
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.attention import AttentionBatch, paged_attention
from qwenstack.models.fast_paths import NATIVE_ATTENTION_OPS, NativeRMSNorm, prepare_for_cpu
from qwenstack.models.layers import Attention, RMSNorm, SwiGLU
from qwenstack.models.qwen3 import run_decoder_layers
from qwenstack.models.registry import load_model

ENTRY_POINTS = ("rms_norm", "add_rms_norm", "silu_mul", "write_kv", "qk_norm_rope", "use_paged_decode",
                "paged_decode_attention", "paged_prefix_attention", "segment_attention", "linear_tiled",
                "linear_rows")
PROMPTS = [[5, 9, 13], list(range(3, 40)), [7] * 17]


def watch(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls into each kernel entry point (the calls still run)."""
    calls = dict.fromkeys(ENTRY_POINTS, 0)

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    for name in ENTRY_POINTS:
        monkeypatch.setattr(kernels, name, counted(name, getattr(kernels, name)))
    return calls


def test_a_model_as_built_reaches_no_kernel(tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    calls = watch(monkeypatch)
    greedy_generate(model, PROMPTS, 6, block_size=4)
    assert not any(calls.values()), calls


def test_preparation_swaps_every_norm_and_attention_layer_once(tiny_qwen3: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    require_native_kernels()
    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    names = set(model.state_dict())
    norms = sum(type(m) is RMSNorm for m in model.modules())
    layers = sum(isinstance(m, Attention) for m in model.modules())
    mlps = sum(isinstance(m, SwiGLU) for m in model.modules())
    done = prepare_for_cpu(model, linears=False)
    assert (done.norms, done.attention_layers, done.activations) == (norms, layers, mlps) and norms > layers > 0
    assert mlps == layers
    assert not any(type(m) is RMSNorm for m in model.modules())
    assert all(m.ops is NATIVE_ATTENTION_OPS for m in model.modules() if isinstance(m, Attention))
    assert set(model.state_dict()) == names  # the same parameters under the same names
    again = prepare_for_cpu(model, linears=False)
    assert (again.norms, again.attention_layers) == (0, layers)
    assert (done.decode_loops, again.decode_loops) == (1, 0)  # the stack's decode loop, built once
    # The layers as prepared (decode steps otherwise take the flat loop: tests/models/test_flat_decode.py).
    model.model.run_layers = run_decoder_layers
    calls = watch(monkeypatch)
    greedy_generate(model, PROMPTS, 8, block_size=4)
    # A batch of fresh prompts takes segment_attention; paged_prefix_attention serves the sequences with a
    # cached context (test_attention_routes_each_sequence_to_its_kernel below).
    assert all(calls[name] for name in ENTRY_POINTS if not name.startswith("linear_")
               and name != "paged_prefix_attention"), calls
    # The same greedy tokens as the model as built: tests/kernels/test_kernels.py, in float32 (in bfloat16 this
    # tiny model's top two logits tie, and any other summation order picks the other one).


def test_preparation_leaves_other_devices_and_float32_norms_alone(tiny_qwen3: Path) -> None:
    model = load_model(tiny_qwen3, dtype=torch.float32).to("meta")
    assert prepare_for_cpu(model).norms == 0  # not on CPU: nothing to swap
    norm = NativeRMSNorm(32, 1e-6)
    x = torch.randn(3, 32)
    assert torch.equal(norm(x), RMSNorm.forward(norm, x))  # float32 stays on torch's sums


@requires_bf16_kernels  # the causal segment kernel's route
@torch.inference_mode()
def test_attention_routes_each_sequence_to_its_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """One mixed batch through the native ops: a fresh prompt of 70 tokens (over the few-token kernel's 64) and
    a 70-token chunk after 10 cached tokens take the causal segment kernel (the second over its gathered
    keys), a 5-token chunk after 11 cached tokens the prefix kernel; a batch of fresh prompts alone goes to the
    segment kernel in one call. Each output matches the reference path's."""
    require_native_kernels()
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block = 4, 2, 64, 16
    query_lens, lens, cached = [70, 5, 70], [70, 16, 80], [0, 11, 10]
    q, k, v = (torch.randn(sum(query_lens), h, head_dim, generator=g).to(torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    kv_cache = torch.zeros(2, 12, block, kv_heads, head_dim, dtype=torch.bfloat16)
    tables = torch.tensor([[0, 1, 2, 3, 4], [5, 0, 0, 0, 0], [6, 7, 8, 9, 10]])
    kv_cache[:, 5, :11] = torch.randn(2, 11, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    kv_cache[:, 6, :10] = torch.randn(2, 10, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    slots = torch.cat([torch.arange(70), 5 * block + torch.arange(11, 16),
                       torch.tensor([tables[2, p // block] * block + p % block for p in range(10, 80)])])

    def batch() -> AttentionBatch:
        return AttentionBatch(query_lens, lens, slot_mapping=slots, block_tables=tables, block_size=block)

    calls = watch(monkeypatch)
    got = NATIVE_ATTENTION_OPS.attend(q, k, v, kv_cache.clone(), batch(), head_dim ** -0.5)
    assert (calls["segment_attention"], calls["paged_prefix_attention"]) == (2, 1), calls
    want = paged_attention(q, k, v, kv_cache.clone(), batch(), head_dim ** -0.5)
    assert (got.float() - want.float()).abs().max().item() < 0.02  # bfloat16 rounding of the outputs
    fresh = AttentionBatch([70, 20], [70, 20])
    q2, k2, v2 = (torch.cat([t[:70], t[:20]]) for t in (q, k, v))
    got = NATIVE_ATTENTION_OPS.attend(q2, k2, v2, None, fresh, head_dim ** -0.5)
    assert calls["segment_attention"] == 3  # both prompts in one call
    want = paged_attention(q2, k2, v2, None, fresh, head_dim ** -0.5)
    assert (got.float() - want.float()).abs().max().item() < 0.02
