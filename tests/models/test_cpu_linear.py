"""Prepacked CPU linears give bit-identical bfloat16 outputs, dense and MoE, tied lm_head included."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.models.base import prompt_logits
from qwenstack.models.cpu_linear import (
    FormTiming, PackedLinear, probe_weights, packing_supported, prepare_cpu_linears, time_forms,
)
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not packing_supported(), reason="this torch build has no oneDNN linear packing")


@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_qwen3_moe"])
def test_packed_logits_are_identical(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    model = load_model(path, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 17, 33, 2, 101, 7, 8, 9]])
    with torch.inference_mode():
        before = prompt_logits(model, ids)
        assert prepare_cpu_linears(model, form="packed") > 0
        after = prompt_logits(model, ids)
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    assert model.lm_head is not None  # a tied model gets its own packed copy of the embedding
    assert torch.equal(before, after)


def test_float32_models_are_left_alone(tiny_qwen3: Path) -> None:
    model = load_model(tiny_qwen3, dtype=torch.float32)
    assert prepare_cpu_linears(model, form="packed") == 0


def test_engine_output_unchanged_by_packing(tiny_qwen3: Path) -> None:
    tok = Tokenizer.from_dir(tiny_qwen3)
    prompts = [[5, 6, 7, 8], [100, 200, 300]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = load_model(tiny_qwen3, dtype=torch.bfloat16)
    from qwenstack.engine.reference import greedy_generate

    want = greedy_generate(reference, prompts, 12)
    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    prepare_cpu_linears(model, form="packed")
    engine = LLMEngine(model, tok, tok.eos_token_ids, EngineConfig(block_size=4, kv_cache_memory=2**20))
    assert [o.outputs[0].token_ids for o in engine.generate_all(prompts, [params] * 2)] == want


def test_form_choice_takes_the_form_that_won_most_rounds() -> None:
    # Most rounds won decides, not one best time (a burst of load can make any single timing an outlier).
    assert FormTiming({"plain": 2, "packed": 1, "native": 4}, {"plain": 0.001, "packed": 0.01, "native": 0.002}).chosen == "native"
    # Equal wins: the best time breaks the tie.
    assert FormTiming({"plain": 3, "native": 3}, {"plain": 0.002, "native": 0.001}).chosen == "native"


def test_form_timing_counts_every_round_and_restores_threads(tiny_qwen3: Path) -> None:
    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    probes = probe_weights(model)
    assert probes and probes[0].numel() == max(m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear)
    threads = torch.get_num_threads()
    timing = time_forms(probes, rounds=5)
    assert torch.get_num_threads() == threads
    assert sum(timing.wins.values()) == 5 and {"plain", "packed"} <= set(timing.wins)
    assert all(0 < t < float("inf") for t in timing.best.values())


def test_every_form_is_timed_on_one_row_and_on_a_batch(tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forms rank differently by rows (without AMX the tiled kernel wins one row and loses a batch by
    1.5-2.5x), so each timing pass multiplies every probe weight by one row and by BATCH_ROWS."""
    from qwenstack import kernels
    from qwenstack.models import cpu_linear

    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    probes = probe_weights(model)
    seen: dict[str, list[tuple[int, int]]] = {"plain": [], "packed": [], "native": []}

    def recorder(form: str, fn):  # noqa: ANN001, ANN202 - wraps a product, records (rows, out_features)
        def call(x: torch.Tensor, w: torch.Tensor, *rest):  # noqa: ANN002, ANN202
            out = fn(x, w, *rest)
            seen[form].append((x.shape[0], out.shape[-1]))
            return out
        return call

    monkeypatch.setattr(cpu_linear.F, "linear", recorder("plain", torch.nn.functional.linear))
    monkeypatch.setattr(cpu_linear, "packed_linear", recorder("packed", cpu_linear.packed_linear))
    monkeypatch.setattr(cpu_linear, "tiled_linear", recorder("native", cpu_linear.tiled_linear))
    monkeypatch.setattr(cpu_linear, "native_linear", recorder("native", cpu_linear.native_linear))
    passes = cpu_linear._form_passes(probes)
    want = sorted((rows, w.shape[0]) for w in probes for rows in (1, cpu_linear.BATCH_ROWS))
    for form, run in passes.items():
        seen[form].clear()
        run()
        # (F.linear also serves the others' fallbacks: count each form's own entry point only.)
        assert sorted(seen[form]) == want, form
    assert "packed" in passes and ("native" in passes) == kernels.linear_rows_available()
