"""FlatDecodeLoop (models/fast_paths.py): a prepared Qwen3 stack (dense or MoE) runs its decode steps as one flat
loop of native ops. It must give the bits the prepared layers give, step after step, for every linear form the
preparation can pick, and leave every step it does not take (prefill, float32, autograd) to them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.cpu_linear import packing_supported, prepare_cpu_linears
from qwenstack.models.fast_paths import FlatDecodeLoop, prepare_for_cpu
from qwenstack.models.qwen3 import run_decoder_layers
from qwenstack.models.registry import load_model
from qwenstack.quantization import quantize_model

PROMPTS = [[5, 9, 13], list(range(3, 40)), [7] * 17]


def prepared(path: Path, form: str, quantization: str | None = None) -> torch.nn.Module:
    model = load_model(path, dtype=torch.bfloat16)
    if quantization:
        quantize_model(model, quantization)
    prepare_cpu_linears(model, form=form)
    prepare_for_cpu(model, linears=False)
    return model


def stack_outputs(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
                  kv_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], list[bool]]:
    """Every forward's hidden states in a greedy run of PROMPTS, and for each whether the flat loop took it."""
    outputs, taken = [], []
    run_layers = model.model.run_layers

    def recorded(layers, x, positions, batch: AttentionBatch, kv_caches):  # noqa: ANN001, ANN202
        taken.append(isinstance(run_layers, FlatDecodeLoop) and run_layers.applies(x, batch, kv_caches))
        out = run_layers(layers, x, positions, batch, kv_caches)
        outputs.append(out.clone())
        return out

    monkeypatch.setattr(model.model, "run_layers", recorded)
    greedy_generate(model, PROMPTS, 6, block_size=4, kv_dtype=kv_dtype)
    monkeypatch.undo()
    return outputs, taken


# The last field: whether each layer is one native call (decode_layer_cpu.cpp), which needs every product
# tile-packed in bfloat16, int8 or int4 (int8 is tile-packed where the CPU has VNNI, int4 where it has AVX512-BF16)
# or int4 on torch's kernel, and a dense SwiGLU; the other stacks run the loop of ops. "int4-torch": int4 kept in
# torch's kernel's packing on any CPU.
@pytest.mark.parametrize("checkpoint,form,quantization,one_call_per_layer", [
    ("tiny_qwen3", "native", None, True), ("tiny_qwen3", "packed", None, False),
    ("tiny_qwen3", "native", "int8", True), ("tiny_qwen3", "native", "int4", True),
    ("tiny_qwen3", "native", "int4-torch", True),
    ("tiny_qwen3_moe", "native", None, False), ("tiny_qwen3_moe", "native", "int8", False),
    ("tiny_qwen3_moe", "native", "int4", False),
])
def test_the_flat_loop_gives_the_layers_bits_at_every_decode_step(request: pytest.FixtureRequest,
                                                                    monkeypatch: pytest.MonkeyPatch, checkpoint: str,
                                                                    form: str, quantization: str | None,
                                                                    one_call_per_layer: bool) -> None:
    require_native_kernels()
    if form == "packed" and not packing_supported():
        pytest.skip("no oneDNN packing in this torch build")
    if quantization == "int4-torch":
        monkeypatch.setattr(kernels, "int4_tiles_preferred", lambda: False)
        quantization = "int4"
    model = prepared(request.getfixturevalue(checkpoint), form, quantization)
    monkeypatch.undo()
    assert isinstance(model.model.run_layers, FlatDecodeLoop)
    quantized = [m.quantized for m in model.model.layers.modules() if hasattr(m, "quantized")]
    if quantization == "int8":
        one_call_per_layer = one_call_per_layer and kernels.int8_tiles_preferred()
    if quantization == "int4":  # tile-packed, or on torch's int4 kernel, which takes some shapes only
        one_call_per_layer = one_call_per_layer and all(q.use_kernel for q in quantized)
        assert all(q.tiled == (kernels.int4_tiles_preferred() and request.node.callspec.params["quantization"]
                               == "int4") for q in quantized)
    assert (model.model.run_layers.decode_layer is not None) == one_call_per_layer
    flat, taken = stack_outputs(model, monkeypatch)
    model.model.run_layers = run_decoder_layers  # the prepared layers, one module call after another
    layered, _ = stack_outputs(model, monkeypatch)
    assert taken == [False] + [True] * 5  # the prefill went through the layers, every decode step through the loop
    assert len(flat) == len(layered) == 6
    for step, (a, b) in enumerate(zip(flat, layered)):
        assert torch.equal(a, b), f"step {step}: {(a.float() - b.float()).abs().max()}"


def test_over_an_fp8_cache_too(tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--kv-cache-dtype fp8: one native call per layer rounds the new keys and values into the float8 pool and
    reads it as the prepared layers do (kernels.write_kv, paged_decode_attention), bit for bit."""
    require_native_kernels()
    model = prepared(tiny_qwen3, "native")
    assert model.model.run_layers.decode_layer is not None
    flat, taken = stack_outputs(model, monkeypatch, torch.float8_e5m2)
    model.model.run_layers = run_decoder_layers
    layered, _ = stack_outputs(model, monkeypatch, torch.float8_e5m2)
    unrounded, _ = stack_outputs(model, monkeypatch)
    assert taken == [False] + [True] * 5
    for step, (a, b) in enumerate(zip(flat, layered)):
        assert torch.equal(a, b), f"step {step}: {(a.float() - b.float()).abs().max()}"
    assert torch.equal(flat[0], unrounded[0]) and not torch.equal(flat[1], unrounded[1])  # prompts attend unrounded


def test_steps_the_loop_does_not_take_go_through_the_layers(tiny_qwen3: Path) -> None:
    require_native_kernels()
    model = prepared(tiny_qwen3, "native")
    loop = model.model.run_layers
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    caches = [torch.zeros(2, 4, 4, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    decode = AttentionBatch([1, 1], [3, 5], torch.tensor([2, 8]), torch.tensor([[0, 0], [1, 2]]), 4)
    prefill = AttentionBatch([3, 5], [3, 5], torch.arange(8), torch.tensor([[0, 0], [1, 2]]), 4)
    with torch.inference_mode():
        assert loop.applies(x, decode, caches)
        assert not loop.applies(x, prefill, caches)
        assert not loop.applies(x.float(), decode, caches)  # another dtype than the layers'
        assert not loop.applies(x, decode, None)  # no KV cache
        assert not loop.applies(x, decode, [c.float() for c in caches])  # a cache of another dtype
        assert loop.applies(x, decode, [c.to(torch.float8_e5m2) for c in caches])  # but float8 (--kv-cache-dtype)
    with torch.no_grad():
        assert loop.applies(x, decode, caches)
    assert not loop.applies(x, decode, caches)  # autograd on: the native ops have no backward
    # A model whose norms stay on torch (float32) keeps the reference stack.
    float32 = load_model(tiny_qwen3, dtype=torch.float32)
    assert prepare_for_cpu(float32).decode_loops == 0 and float32.model.run_layers is run_decoder_layers


def test_one_native_call_per_layer_refuses_a_layer_whose_heads_do_not_fit_its_qkv(tiny_qwen3: Path) -> None:
    """decode_layer takes the heads as arguments: a count that disagrees with the fused qkv product is a clear
    error before the cache is written, not a read past the product's end."""
    require_native_kernels()
    model = prepared(tiny_qwen3, "native")
    loop = model.model.run_layers
    assert loop.decode_layer is not None
    layer = loop.layers[0]
    *weights, q_heads, kv_heads = layer.native
    x = torch.randn(1, model.args.hidden_size, dtype=torch.bfloat16)
    cos, sin = loop.rotary.cos_sin(torch.tensor([2]), x.dtype)
    cache = torch.zeros(2, 4, 4, kv_heads, layer.head_dim, dtype=torch.bfloat16)
    tables, lens, slots = torch.tensor([[0, 1]]), torch.tensor([3]), torch.tensor([2])
    with torch.inference_mode():
        x_out, mlp_out = loop.decode_layer(x, x.new_empty(0), *weights, q_heads, kv_heads, cos, sin, cache, slots,
                                           tables, lens, layer.scale)
        assert x_out.shape == mlp_out.shape == x.shape  # (their bits: the test above, through the loop)
        assert cache[0, 0, 2].abs().sum() > 0  # the new key went to slot 2
        cache.zero_()
        with pytest.raises(RuntimeError, match="qkv product has"):
            loop.decode_layer(x, x.new_empty(0), *weights, q_heads + 1, kv_heads, cos, sin, cache, slots, tables,
                              lens, layer.scale)
    assert cache.abs().sum() == 0


def test_a_stack_with_hooks_keeps_the_layers(tiny_qwen3: Path) -> None:
    """The flat loop calls no module of a layer, so a hook on one would not run: tensor parallelism sums each
    rank's attention and MLP outputs in forward hooks, and a bfloat16 TP=2 decode that skipped them diverged
    from one rank at its second token. A stack with hooks keeps the layers (and their hooks)."""
    require_native_kernels()
    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    calls = []
    model.model.layers[1].mlp.register_forward_hook(lambda module, inputs, output: calls.append(1))
    assert prepare_for_cpu(model).decode_loops == 0 and model.model.run_layers is run_decoder_layers
    greedy_generate(model, PROMPTS, 3, block_size=4)
    assert len(calls) == 3  # the prefill and both decode steps ran the hooked module
