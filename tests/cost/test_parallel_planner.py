"""The parallel planner (`qwenstack plan MODEL --gpus 8xH200`, `--cpus N`) against per-rank figures worked out
by hand from the published configs and qwenstack's layout (qwenstack/distributed/shard.py), its layout
rules, its communication model, and the command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenstack.cli import main
from qwenstack.cost import bandwidth as bw
from qwenstack.cost.known_configs import GPU_MEMORY_UTILIZATION, INTERCONNECTS, parse_gpus
from qwenstack.cost.parallel import (
    Shape, cpu_cluster, gpu_cluster, layout_problem, max_experts_per_rank, plan_parallel, step_communication,
)
from qwenstack.cost.planner import ConfigSource
from qwenstack.cost.report import format_parallel
from test_planner import QWEN3_0_6B, QWEN3_235B_A22B, QWEN3_NEXT_80B, V

QWEN3_8B = dict(QWEN3_0_6B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=False)


def source(config: dict) -> ConfigSource:
    return ConfigSource(config, "test", "test")


def nvlink_all_reduce(nbytes: float, ranks: int) -> float:
    # known_configs: 4 us per collective + 1 us per ring hop + 2(R-1)/R of the bytes at 370 GB/s.
    return 4e-6 + 2 * (ranks - 1) * 1e-6 + 2 * (ranks - 1) / ranks * nbytes / 370e9


def test_qwen3_235b_a22b_on_8xh200_by_hand() -> None:
    plan = plan_parallel(source(QWEN3_235B_A22B), gpu_cluster("8xH200"), context=40960)
    h, layers, e, k, i = 4096, 94, 128, 8, 1536
    usable = 0.9 * 141e9

    def rank_params(r: int) -> tuple[int, int]:
        """(held, read per token) parameters of one rank at TP=r (no EP): query heads split, one KV head
        kept per rank once there are fewer than ranks, every expert's intermediate size split."""
        kv_local = 4 // r if 4 % r == 0 else 1
        attention = h * (64 * 128 // r + 2 * kv_local * 128) + (64 * 128 // r) * h + 2 * 128
        experts = e * 3 * (i // r) * h
        rest = attention + e * h + 2 * h  # + the router and two norms, whole on every rank
        vocab = -(-V // r) * h
        held = layers * (rest + experts) + 2 * vocab + h
        read = layers * (rest + experts * k // e) + vocab + h  # the embedding is a lookup, not a read
        return held, read

    tp = {(o.tensor_parallel, o.expert_parallel): o for o in plan.options}
    assert 2 * rank_params(1)[0] == 470_187_269_120  # the whole model in bf16: "470 GB"
    for r in (1, 2, 4, 8):
        held, _ = rank_params(r)
        assert tp[(r, False)].weights.memory == 2 * held
        kv_heads = 4 // r if r <= 4 else 1  # 8 ranks: 4 KV heads, each kept by two ranks
        assert tp[(r, False)].kv_bytes == layers * 2 * kv_heads * 128 * 2 * 40960
    assert [r for r in (1, 2, 4, 8) if tp[(r, False)].fits] == [4, 8]
    assert 2 * rank_params(2)[0] > usable > 2 * rank_params(4)[0] + layers * 2 * 128 * 2 * 40960
    assert all(tp[(r, ep)].problem for r in (3, 5, 6, 7) for ep in (False, True))

    best = plan.smallest
    assert (best.tensor_parallel, best.expert_parallel, plan.replicas) == (4, False, 2)
    # Speed at TP=4: the rank's active weights and its KV head at 40,960 tokens, over 4.8 TB/s, plus the
    # communication: 2 x 94 + 1 all-reduces of one bf16 hidden row, the logits all-gather, two broadcasts.
    read = 2 * rank_params(4)[1] + layers * 2 * 128 * 2 * 40960
    comm = (2 * layers + 1) * nvlink_all_reduce(2 * h, 4) + (4e-6 + 3e-6 + 3 * 37984 * 2 / 370e9) \
        + 2 * (4e-6 + 3e-6)
    full = best.speeds[-1]
    assert full.bound_tok_s == pytest.approx(4.8e12 / read)
    assert full.expected_tok_s == pytest.approx(1 / (read / 4.8e12 + comm))
    assert best.comm.seconds == pytest.approx(comm)
    # Expert parallelism: the same bytes held, but the busiest rank reads more than 8/4 experts per token.
    assert tp[(4, True)].weights.memory == pytest.approx(best.weights.memory, rel=1e-3)
    assert 2 < max_experts_per_rank(128, 8, 4) < 8
    assert tp[(4, True)].speeds[-1].bound_tok_s < full.bound_tok_s

    text = format_parallel(plan)
    assert "Smallest layout that fits: TP=4" in text
    assert "--tensor-parallel-size 4 --data-parallel-size 2" in text
    assert "64 attention heads do not split over 3 ranks" in text and "dispatch-based EP" in text


def test_qwen3_8b_on_one_gpu() -> None:
    plan = plan_parallel(source(QWEN3_8B), gpu_cluster("1xH100"), context=32768)
    assert [o.tensor_parallel for o in plan.options] == [1]
    best = plan.smallest
    assert best is not None and best.tensor_parallel == 1 and plan.replicas == 1
    assert best.comm.seconds == 0 and best.comm.all_reduces == 0
    assert all(s.expected_tok_s == s.bound_tok_s for s in best.speeds)  # one GPU: nothing but the read
    params = 8_190_735_360  # Qwen3-8B's published total (embedding and untied lm_head included)
    assert best.weights.memory == 2 * params
    assert best.kv_bytes == 36 * 2 * 8 * 128 * 2 * 32768
    fp8 = plan_parallel(source(QWEN3_8B), gpu_cluster("1xH100"), context=32768, kv_cache_dtype="fp8")
    assert fp8.smallest is not None and fp8.smallest.kv_bytes == best.kv_bytes // 2 and fp8.kv_dtype == "float8_e5m2"


def test_a_model_that_fits_at_no_tensor_parallel_size() -> None:
    plan = plan_parallel(source(QWEN3_235B_A22B), gpu_cluster("2xH100"), context=4096)
    assert plan.smallest is None and plan.replicas == 0
    built = [o for o in plan.options if not o.problem]
    assert max(o.tensor_parallel for o in built) == 2 and not any(o.fits for o in built)
    assert "Does NOT fit on 2xH100 at any layout" in format_parallel(plan)


def test_layout_rules_follow_shard_py() -> None:
    from qwenstack.models.registry import build_model

    small = Shape.of(QWEN3_0_6B, build_model(QWEN3_0_6B, "meta"))  # 16 heads, 8 KV heads, intermediate 3072
    assert layout_problem(small, 3, False) == "16 attention heads do not split over 3 ranks"
    assert layout_problem(small, 2, False) is None and layout_problem(small, 16, False) is None  # 16: KV copies
    odd = Shape(12, 4, 1024, 2, V, 0, 0, 0, (3072,), 0)
    assert layout_problem(odd, 6, False) == "4 KV heads neither divide nor are divided by 6 ranks"
    assert layout_problem(odd, 12, False) is None
    moe = Shape(64, 4, 4096, 2, V, 128, 8, 0, (), 1536)
    assert layout_problem(moe, 8, True) is None
    assert layout_problem(replace_experts(moe, 100), 8, True) == "100 experts do not split over 8 ranks"
    assert layout_problem(replace_experts(moe, 100), 8, False) is None  # split inside each expert instead
    assert layout_problem(small, 2, True) == "expert parallelism needs a MoE model"
    nxt = Shape.of(QWEN3_NEXT_80B, build_model(QWEN3_NEXT_80B, "meta"))
    assert nxt.linear_key_heads == 16 and layout_problem(nxt, 4, False) is None

    # Qwen3-VL: the decoder's heads set the rules; the vision tower is held whole by every rank.
    vl = dict(model_type="qwen3_vl", image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
              vision_end_token_id=151653, tie_word_embeddings=True, text_config=dict(QWEN3_0_6B),
              vision_config=dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=1024,
                                 patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                                 num_position_embeddings=2304, deepstack_visual_indexes=[0], in_channels=3,
                                 hidden_act="gelu_pytorch_tanh"))
    vl["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                            "mrope_interleaved": True}
    from qwenstack.cost.planner import model_matrices
    from qwenstack.cost.parallel import rank_matrices

    vl_matrices = model_matrices(vl)
    vl_shape = Shape.of(vl, build_model(vl, "meta"))
    assert (vl_shape.heads, vl_shape.kv_heads) == (16, 8)
    halves = {m.name: m for m in rank_matrices(vl_matrices, vl_shape, 2, False)}
    visual = [m for m in vl_matrices if ".visual." in f".{m.name}"]
    assert visual and all(halves[m.name] == m for m in visual)

    # More ranks than KV heads: the KV cache per rank stops shrinking (each rank keeps one head).
    plan = plan_parallel(source(QWEN3_0_6B), gpu_cluster("16xL4"), context=1024)
    kv = {o.tensor_parallel: o.kv_bytes for o in plan.options if not o.problem}
    assert kv[8] == kv[16] == kv[1] / 8 and kv[4] == kv[1] / 4


def replace_experts(shape: Shape, experts: int) -> Shape:
    from dataclasses import replace

    return replace(shape, num_experts=experts)


@pytest.mark.parametrize("link", sorted(INTERCONNECTS))
def test_communication_grows_with_the_tensor_parallel_size(link: str) -> None:
    shape = Shape(64, 4, 4096, 94, V, 128, 8, 0, (), 1536)
    costs = [step_communication(shape, r, 2, INTERCONNECTS[link], moe_layers=94) for r in range(1, 17)]
    assert costs[0].seconds == 0 and costs[0].all_to_all_bytes == 0
    assert all(a.seconds < b.seconds for a, b in zip(costs, costs[1:]))
    assert all(a.all_reduce_seconds < b.all_reduce_seconds for a, b in zip(costs, costs[1:]))
    assert all(c.all_reduces == 2 * 94 + 1 for c in costs[1:])


def test_expected_never_exceeds_the_bound_on_any_cluster() -> None:
    # A disturbed CPU measurement (kernels faster than the stream) and a GPU cluster.
    disturbed = bw.Bandwidth("cpu", 4.3e9, {"bfloat16": 4.3e9, "int8": 9e9, "int4": 14e9},
                             overhead={"step": 1e-3, "layer": 1e-4, "moe_layer": 1e-4, "expert": 1e-5})
    clusters = [gpu_cluster("8xH200"), gpu_cluster("4xL40S"), cpu_cluster("4x512G", disturbed, "10gbe")]
    for cluster in clusters:
        for quantization in (None, "int8", "int4"):
            plan = plan_parallel(source(QWEN3_235B_A22B), cluster, context=2048, quantization=quantization)
            speeds = [s for o in plan.options for s in o.speeds]
            assert speeds and all(s.expected_tok_s <= s.bound_tok_s for s in speeds)


def test_node_and_gpu_specs_are_parsed_or_refused() -> None:
    assert parse_gpus("8xH200")[0] == 8 and parse_gpus("h100")[1].name == "H100"
    for bad in ("8xB300", "0xH100", "eightxH100"):
        with pytest.raises(ValueError, match="--gpus wants"):
            parse_gpus(bad)
    fixed = bw.Bandwidth("cpu", 20e9)
    assert cpu_cluster("4x512G", fixed).memory == 512e9 and cpu_cluster("2", fixed, ram=64e9).memory == 64e9
    for bad in ("", "4x", "4xlots", "x512G"):
        with pytest.raises(ValueError, match="--cpus wants"):
            cpu_cluster(bad, fixed)
    assert gpu_cluster("2xH200").usable_bytes == GPU_MEMORY_UTILIZATION * 141e9


@pytest.fixture()
def fixed_bandwidth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bw.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(bw.OVERRIDE_ENV, "stream=20,bfloat16=15,int8=16,int4=12")


def test_plan_command_answers_parallel_layouts(fixed_bandwidth: None, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "tp.json"
    assert main(["plan", "Qwen/Qwen3-235B-A22B", "--gpus", "8xH200", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen3-235B-A22B on 8xH200" in out and "qwenstack serve MODEL --tensor-parallel-size 4" in out
    record = json.loads(out_json.read_text())
    assert record["kind"] == "parallel_plan" and record["smallest"] == "TP=4" and record["replicas"] == 2

    assert main(["plan", "Qwen/Qwen3-235B-A22B", "--cpus", "8x256G", "--network", "100gbe",
                 "--quantization", "int8", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    # int8 is ~236 GB: over one node's 0.9 x 256 GB, within two.
    assert "8 x cpu node (256G RAM" in out and "100gbe" in out and "Smallest layout that fits: TP=2" in out
    assert "--data-parallel-size 4" in out
    assert main(["plan", "Qwen/Qwen3-8B", "--gpus", "8xB300"]) == 1
    with pytest.raises(SystemExit):  # one or the other
        main(["plan", "Qwen/Qwen3-8B", "--gpus", "2xH100", "--cpus", "2"])
