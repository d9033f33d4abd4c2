"""Parallel layouts for `qwenstack plan MODEL --gpus 8xH200` (or `--cpus 4`): the smallest tensor-parallel
size (and, for MoE, whether to spread the experts) that fits, what each rank holds, and the decode speed
with the communication included.

    cluster = gpu_cluster("8xH200")                       # or cpu_cluster("4", cpu_bandwidth(), "25gbe")
    plan = plan_parallel(source, cluster, context=40960, quantization="fp8")
    print(format_parallel(plan))

Decisions:
- The layout is qwenstack's own (qwenstack/distributed/shard.py), so a plan is what `serve
  --tensor-parallel-size R` would build: attention split by heads (R must divide the query heads; the KV
  heads must divide R or be divided by it, and with fewer KV heads than ranks each rank keeps a copy of
  one), MLPs and experts split inside their intermediate size, or whole experts spread over the ranks with
  --expert-parallel (R must divide num_experts), vocabulary-parallel embedding and lm_head; norms, the
  router and Qwen3-Next's small per-head vectors of the kept heads stay on every rank.
- Per rank memory: that rank's weights (the format's bytes, scales included) plus its KV cache (its KV
  heads x context x sequences) plus its share of the linear-attention state; it fits when that is at most
  the usable share of one device (known_configs: 0.9 of a GPU's or a node's memory).
- Communication per decode step, batch of one token (what qwenstack sends, from shard.py and executor.py):
  two all-reduces of hidden_size x dtype per layer (attention or linear attention, then the MLP or MoE), one
  for the vocabulary-parallel embedding, the all-gather of the lm_head's logit slices (vocab/R x dtype from
  each rank) and the driver's broadcast of the step (two small broadcasts). Ring costs: an all-reduce of n
  bytes takes call + 2(R-1) hops + 2(R-1)/R n / bandwidth; an all-gather call + (R-1) hops + (R-1) slices /
  bandwidth. Every term grows with R.
- Expert parallelism in qwenstack keeps the router on every rank and sums the experts' partial outputs in
  the MoE layer's all-reduce, so it sends what TP sends. A dispatch-based EP (vLLM, DeepEP) would instead
  send each token to its top_k experts' ranks and back: 2 x top_k x (R-1)/R x hidden x dtype per MoE
  layer. That figure is reported beside the plan, not used in it.
- Speed: each rank reads its share of the active weights and its KV per token; the slowest rank sets the
  pace. With expert parallelism a token's top_k experts land unevenly: the rank with the most of them is
  what counts (expected maximum under uniform routing, a Monte-Carlo estimate with a fixed seed; real routers
  are less even, so this is optimistic). bound = memory bandwidth / per-rank bytes per token, no
  communication; expected = the same bytes at the kernel rate (CPU) or at the datasheet peak (GPU), plus
  the step overhead (CPU, measured here) plus the communication above, and never above the bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from qwenstack.cost.bandwidth import Bandwidth
from qwenstack.cost.known_configs import (
    CPU_MEMORY_UTILIZATION, GPU_MEMORY_UTILIZATION, INTERCONNECTS, Interconnect, parse_gpus,
)
from qwenstack.cost.planner import (
    _FLOAT_BYTES, ConfigSource, Matrix, SpeedEstimate, WeightBytes, _format_name, _speeds, machine_memory,
    model_matrices, weight_bytes,
)


@dataclass(frozen=True)
class Cluster:
    kind: str  # "gpu" or "cpu"
    count: int  # devices (GPUs) or nodes (CPU), one rank each
    device: str  # "H200", or "cpu node (this machine)"
    memory: float  # bytes per device
    usable: float  # share of `memory` planned for weights, KV and state
    bandwidth: Bandwidth  # one device's memory read rates
    link: Interconnect

    @property
    def usable_bytes(self) -> float:
        return self.memory * self.usable

    def describe(self) -> str:
        return f"{self.count}x{self.device}" if self.kind == "gpu" else f"{self.count} x {self.device}"


def gpu_cluster(spec: str) -> Cluster:
    count, gpu = parse_gpus(spec)
    return Cluster("gpu", count, gpu.name, gpu.memory, GPU_MEMORY_UTILIZATION,
                   Bandwidth(gpu.name, gpu.hbm, source="datasheet"), INTERCONNECTS[gpu.link])


def cpu_cluster(spec: str, bandwidth: Bandwidth, network: str = "25gbe", ram: float | None = None) -> Cluster:
    """'4': four nodes like this one (its RAM, its measured bandwidth); '4x512G': four nodes of 512 GB of RAM
    each, reading memory at this machine's rate."""
    count, sep, size = spec.strip().lower().partition("x")
    if not count.isdigit() or int(count) < 1 or (sep and not _parse_size(size)):
        raise ValueError(f"--cpus wants a node count, optionally with each node's RAM: 4, 4x512G; got {spec!r}")
    if network not in INTERCONNECTS:
        raise ValueError(f"unknown network '{network}' (use {', '.join(INTERCONNECTS)})")
    memory = _parse_size(size) if sep else (ram if ram is not None else float(machine_memory().ram_total))
    label = "cpu node (this machine)" if not sep else f"cpu node ({size.upper()} RAM, this machine's bandwidth)"
    return Cluster("cpu", int(count), label, float(memory), CPU_MEMORY_UTILIZATION, bandwidth,
                   INTERCONNECTS[network])


def _parse_size(text: str) -> float:
    units = {"g": 1e9, "gb": 1e9, "gib": 2 ** 30, "t": 1e12, "tb": 1e12, "tib": 2 ** 40}
    number = text.rstrip("gibt")
    unit = text[len(number):]
    try:
        return float(number) * units[unit] if unit in units and float(number) > 0 else 0.0
    except ValueError:
        return 0.0


# --- what one rank holds ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """The counts the layout rules read: config.json's, and the MLP sizes of the model qwenstack builds."""

    heads: int
    kv_heads: int
    hidden: int
    layers: int
    vocab: int
    num_experts: int  # 0 for dense
    top_k: int
    linear_key_heads: int  # Qwen3-Next; 0 otherwise
    mlp_sizes: tuple[int, ...]  # intermediate sizes of the dense MLPs and shared experts (always split)
    expert_size: int  # moe_intermediate_size (split unless the experts are spread whole); 0 for dense

    @classmethod
    def of(cls, config: dict[str, Any], model: nn.Module) -> "Shape":
        from qwenstack.models.layers import SwiGLU
        from qwenstack.models.moe import Experts

        mlp_sizes = {m.intermediate_size for m in model.modules() if isinstance(m, SwiGLU)}
        expert_sizes = {m.intermediate_size for m in model.modules() if isinstance(m, Experts)}
        text = config.get("text_config") or config  # Qwen3-VL: the decoder's counts (its vision tower is replicated)
        heads = int(text["num_attention_heads"])
        linear = int(text.get("linear_num_key_heads") or 0) if config.get("model_type") == "qwen3_next" else 0
        return cls(heads, int(text.get("num_key_value_heads") or heads), int(text["hidden_size"]),
                   int(text["num_hidden_layers"]), int(text["vocab_size"]), int(text.get("num_experts") or 0),
                   int(text.get("num_experts_per_tok") or 0), linear, tuple(sorted(mlp_sizes)),
                   max(expert_sizes, default=0))


def layout_problem(shape: Shape, ranks: int, expert_parallel: bool) -> str | None:
    """Why shard.py would refuse this layout, or None when it can be built."""
    if shape.heads % ranks:
        return f"{shape.heads} attention heads do not split over {ranks} ranks"
    if shape.kv_heads % ranks and ranks % shape.kv_heads:
        return f"{shape.kv_heads} KV heads neither divide nor are divided by {ranks} ranks"
    if shape.linear_key_heads and shape.linear_key_heads % ranks:
        return f"{shape.linear_key_heads} linear-attention key heads do not split over {ranks} ranks"
    sizes = list(shape.mlp_sizes)
    if expert_parallel:
        if not shape.num_experts:
            return "expert parallelism needs a MoE model"
        if shape.num_experts % ranks:
            return f"{shape.num_experts} experts do not split over {ranks} ranks"
    elif shape.expert_size:
        sizes.append(shape.expert_size)
    for size in sizes:
        if size % ranks:
            return f"intermediate size {size} does not split over {ranks} ranks"
    return None


def kv_heads_per_rank(shape: Shape, ranks: int) -> int:
    """The KV heads one rank holds: a share of them, or one copy when there are fewer than ranks."""
    return shape.kv_heads // ranks if shape.kv_heads % ranks == 0 else 1


def rank_matrices(matrices: list[Matrix], shape: Shape, ranks: int, expert_parallel: bool,
                  experts_read_per_rank: float | None = None) -> list[Matrix]:
    """The weights one rank holds (and reads per token) under qwenstack's layout."""
    if ranks == 1:
        return matrices
    vocab_rows = -(-shape.vocab // ranks)
    kv_local = kv_heads_per_rank(shape, ranks)
    out = []
    for m in matrices:
        name = m.name
        if ".visual." in f".{name}":
            out.append(m)  # Qwen3-VL's vision tower runs whole on every rank (shard.py leaves it alone)
        elif m.lookup_only or name.startswith("lm_head"):
            out.append(replace(m, rows=vocab_rows))
        elif name.endswith("self_attn.qkv_proj.weight"):
            # rows: q (or q + gate) of every head, then k and v of every KV head, head_dim each.
            kv_rows = 2 * shape.kv_heads * _head_dim(m, shape)
            q_rows = m.rows - kv_rows
            out.append(replace(m, rows=q_rows // ranks + 2 * kv_local * _head_dim(m, shape)))
        elif ".experts." in name and expert_parallel:
            active = experts_read_per_rank if experts_read_per_rank is not None else m.active / ranks
            out.append(replace(m, count=m.count / ranks, active=active))
        elif name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")) or name.endswith(
                "experts.down_proj"):
            out.append(replace(m, cols=m.cols // ranks))  # row-parallel: input columns split
        elif m.cols > 1 and ("linear_attn." in name or "mlp." in name) and not name.endswith(
                ("gate.weight", "shared_expert_gate.weight")):
            out.append(replace(m, rows=m.rows // ranks))  # column-parallel: output rows split
        elif m.cols == 1 and "linear_attn." in name and not name.endswith("norm.weight"):
            out.append(replace(m, rows=m.rows // ranks))  # conv channels, dt_bias, A_log of the kept heads
        else:
            out.append(m)  # norms, router, shared-expert gate: whole on every rank
    return out


def _head_dim(qkv: Matrix, shape: Shape) -> int:
    # q rows are heads x head_dim (x2 with Qwen3-Next's gate); solve for head_dim from the row count.
    for gate in (1, 2):
        hd, rest = divmod(qkv.rows, gate * shape.heads + 2 * shape.kv_heads)
        if rest == 0:
            return hd
    raise ValueError(f"cannot read head_dim from {qkv.name} ({qkv.rows} rows)")


def max_experts_per_rank(num_experts: int, top_k: int, ranks: int, samples: int = 4096, seed: int = 0) -> float:
    """Expected largest number of one token's top_k experts that fall on one rank (uniform routing, experts in
    contiguous blocks of num_experts/ranks): the slowest rank's share under expert parallelism."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(samples, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    owner = picks // (num_experts // ranks)
    counts = torch.zeros(samples, ranks).scatter_add_(1, owner, torch.ones_like(owner, dtype=torch.float))
    return float(counts.max(dim=1).values.mean())


# --- communication ------------------------------------------------------------------------------------

@dataclass
class CommCost:
    all_reduces: int  # per decode step
    all_reduce_bytes: int  # payload of each (hidden x dtype, one token)
    gather_bytes: int  # each rank's logit slice
    seconds: float  # per decode step, everything below included
    all_reduce_seconds: float
    gather_seconds: float
    broadcast_seconds: float
    all_to_all_bytes: int = 0  # a dispatch-based EP's traffic per step (not what qwenstack sends)


def all_reduce_seconds(nbytes: float, ranks: int, link: Interconnect) -> float:
    if ranks == 1:
        return 0.0
    return link.call_latency_s + 2 * (ranks - 1) * link.hop_latency_s + 2 * (ranks - 1) / ranks * nbytes / link.bandwidth


def all_gather_seconds(slice_bytes: float, ranks: int, link: Interconnect) -> float:
    if ranks == 1:
        return 0.0
    return link.call_latency_s + (ranks - 1) * link.hop_latency_s + (ranks - 1) * slice_bytes / link.bandwidth


def step_communication(shape: Shape, ranks: int, act_bytes: int, link: Interconnect, moe_layers: int,
                       batch: int = 1) -> CommCost:
    n = shape.hidden * batch * act_bytes
    count = 2 * shape.layers + 1  # attention and MLP of every layer, and the embedding
    gather = -(-shape.vocab // ranks) * batch * act_bytes
    reduce_s = count * all_reduce_seconds(n, ranks, link)
    gather_s = all_gather_seconds(gather, ranks, link)
    # The driver's step message: a length, then a pickle of a few hundred bytes (small: latency only).
    broadcast_s = 0.0 if ranks == 1 else 2 * (link.call_latency_s + (ranks - 1) * link.hop_latency_s)
    all_to_all = int(2 * shape.top_k * (ranks - 1) / ranks * n) * moe_layers if ranks > 1 else 0
    return CommCost(count if ranks > 1 else 0, n, gather if ranks > 1 else 0, reduce_s + gather_s + broadcast_s,
                    reduce_s, gather_s, broadcast_s, all_to_all)


# --- the plan -----------------------------------------------------------------------------------------

@dataclass
class LayoutOption:
    tensor_parallel: int
    expert_parallel: bool
    problem: str | None  # why this layout cannot be built; None when it can
    weights: WeightBytes | None = None  # per rank
    kv_bytes: float = 0.0  # per rank: KV cache of every sequence at the full context
    state_bytes: float = 0.0  # per rank: linear-attention state of every sequence
    comm: CommCost | None = None
    speeds: list[SpeedEstimate] = field(default_factory=list)  # single stream, per context
    fits: bool = False

    @property
    def needed_bytes(self) -> float:
        return (self.weights.memory if self.weights else 0.0) + self.kv_bytes + self.state_bytes

    @property
    def label(self) -> str:
        return f"TP={self.tensor_parallel}" + (" +EP" if self.expert_parallel else "")


@dataclass
class ParallelPlan:
    name: str
    cluster: Cluster
    quantization: str
    act_dtype: str
    context: int
    concurrency: int
    options: list[LayoutOption]
    note: str | None = None
    kv_dtype: str = "bfloat16"  # the KV cache's element type

    @property
    def smallest(self) -> LayoutOption | None:
        """The layout with the fewest ranks that fits; among those, the faster at the full context."""
        fitting = [o for o in self.options if o.fits]
        if not fitting:
            return None
        fewest = min(o.tensor_parallel for o in fitting)
        return max((o for o in fitting if o.tensor_parallel == fewest), key=lambda o: o.speeds[-1].expected_tok_s)

    @property
    def replicas(self) -> int:
        """Data-parallel replicas of the smallest layout the cluster holds."""
        best = self.smallest
        return self.cluster.count // best.tensor_parallel if best else 0


def plan_parallel(source: ConfigSource, cluster: Cluster, context: int | None = None, concurrency: int = 1,
                  quantization: str | None = None, act_dtype: str = "bfloat16",
                  short_context: int = 16, kv_cache_dtype: str = "auto") -> ParallelPlan:
    """kv_cache_dtype: --kv-cache-dtype's name (engine/runner.py's kv_cache_dtype): fp8 halves the KV cache."""
    from qwenstack.engine.runner import kv_cache_dtype as kv_dtype_of
    from qwenstack.models.moe import Experts
    from qwenstack.models.registry import build_model

    config = source.config
    fmt = _format_name(quantization, act_dtype)
    matrices = model_matrices(config)
    model = build_model(config, "meta")
    shape = Shape.of(config, model)
    dtype = getattr(torch, act_dtype)
    kv_dtype = kv_dtype_of(kv_cache_dtype, dtype)
    kv_per_token = model.kv_cache_spec().bytes_per_token(kv_dtype)
    state = model.state_bytes_per_slot(dtype) if hasattr(model, "state_bytes_per_slot") else 0
    moe_layers = sum(1 for m in model.modules() if isinstance(m, Experts))
    context = context or int(config.get("max_position_embeddings") or 0)
    contexts = sorted({min(short_context, context), context})
    act_bytes = _FLOAT_BYTES[act_dtype]
    shared = 1 if config.get("shared_expert_intermediate_size") else 0
    overhead = cluster.bandwidth.step_overhead(shape.layers, moe_layers, shape.top_k + shared if moe_layers else 0) \
        if cluster.kind == "cpu" else 0.0
    options = []
    for ranks in range(1, cluster.count + 1):
        for ep in ((False, True) if moe_layers and ranks > 1 else (False,)):
            problem = layout_problem(shape, ranks, ep)
            option = LayoutOption(ranks, ep, problem)
            options.append(option)
            if problem:
                continue
            read_per_rank = (max_experts_per_rank(shape.num_experts, shape.top_k, ranks) if ep else None)
            mine = rank_matrices(matrices, shape, ranks, ep, read_per_rank)
            option.weights = weight_bytes(mine, fmt, act_dtype)
            kv_rank = kv_per_token * kv_heads_per_rank(shape, ranks) / shape.kv_heads if shape.kv_heads else 0
            state_rank = state / ranks if shape.linear_key_heads else state
            option.kv_bytes = kv_rank * context * concurrency
            option.state_bytes = state_rank * concurrency
            option.fits = option.needed_bytes <= cluster.usable_bytes
            option.comm = step_communication(shape, ranks, act_bytes, cluster.link, moe_layers)
            rate_fmt = fmt if cluster.kind == "cpu" else "stream"
            option.speeds = _speeds(option.weights, rate_fmt, act_dtype, int(kv_rank), int(state_rank), contexts,
                                    cluster.bandwidth, overhead + option.comm.seconds, shape.hidden)
    return ParallelPlan(source.name, cluster, fmt, act_dtype, context, concurrency, options, source.note,
                        kv_dtype=str(kv_dtype).removeprefix("torch."))
