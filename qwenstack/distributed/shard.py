"""The preparation pass: a loaded model (already quantized, if it is) becomes this rank's shard, in place.

    group = ParallelGroup.connect(host, port, rank, world_size)
    report = shard_model(model, group, expert_parallel=False)

Megatron's layout (as vLLM and gpt-fast arrange it), applied after loading so the model files stay
single-rank:
- Attention: q/k/v rows of this rank's heads (column-parallel), o_proj's matching input columns
  (row-parallel), one all-reduce on the attention output. With fewer KV heads than ranks, each rank keeps
  the one KV head its query heads read (replicated KV); otherwise KV heads are split like the query heads.
  Qwen3-Next's gated attention keeps its per-head [q | gate] rows together.
- Qwen3-Next's Gated DeltaNet: split by key head (each key head with its value heads, conv channels, decay
  and output columns), so the recurrent state is split too; one all-reduce on its output.
- Dense MLP: gate/up rows and down_proj columns of this rank's slice of the intermediate size; one
  all-reduce. MoE: the router stays whole on every rank (identical routing); the experts are split inside
  (each expert's intermediate size, the default) or across ranks (expert_parallel); a shared expert is
  split like a dense MLP; the layer's partial sums meet in one all-reduce.
- Embedding and lm_head: vocabulary-parallel (layers.py). The vision tower of Qwen3-VL is replicated: it
  runs once per image, and its output enters the decoder like embeddings.
- The model's args are copied with this rank's KV (and linear-attention) head counts, so the engine sizes
  the paged KV pool and the recurrent-state slots per rank from the usual kv_cache_spec().
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from qwenstack.distributed.group import ParallelGroup
from qwenstack.distributed.layers import ExpertParallelExperts, ParallelLMHead, VocabParallelEmbedding, add_all_reduce
from qwenstack.distributed.slicing import (
    head_rows, slice_experts_quantized, slice_quantized, take_cols, take_rows,
)
from qwenstack.errors import UnsupportedModelError
from qwenstack.models.layers import Attention, SwiGLU
from qwenstack.models.moe import Experts, SparseMoE
from qwenstack.quantization.modules import QuantExperts


@dataclass
class ShardReport:
    rank: int
    world_size: int
    attention: int = 0
    linear_attention: int = 0
    mlp: int = 0
    moe: int = 0
    kv_heads_per_rank: int = 0
    kv_replicated: bool = False
    expert_parallel: bool = False
    notes: list[str] = field(default_factory=list)


def shard_model(model: nn.Module, group: ParallelGroup, expert_parallel: bool = False) -> ShardReport:
    report = ShardReport(group.rank, group.world_size, expert_parallel=expert_parallel)
    if group.world_size == 1:
        return report
    if getattr(model, "is_embedding_model", False):  # its passes run in one process (LLMEngine.embed)
        raise UnsupportedModelError("embedding and classification models are not supported with tensor "
                                    "parallelism: serve them without --tensor-parallel-size")
    if getattr(model, "mtp", None) is not None:
        raise UnsupportedModelError("speculative decoding (the MTP head) is not supported with tensor parallelism yet")
    text = _text_model(model)
    for layer in text.layers:
        if hasattr(layer, "self_attn"):
            _shard_attention(layer.self_attn, group, report)
        if hasattr(layer, "linear_attn"):
            _shard_delta_net(layer.linear_attn, group, report)
        mlp = layer.mlp
        if isinstance(mlp, SparseMoE):
            _shard_moe(mlp, group, expert_parallel, report)
        elif isinstance(mlp, SwiGLU):
            _shard_swiglu(mlp, group)
            report.mlp += 1
        else:
            raise UnsupportedModelError(f"cannot split an MLP of type {type(mlp).__name__}")
        add_all_reduce(mlp, group)
    vocab = text.embed_tokens.weight.shape[0]
    embedding = VocabParallelEmbedding(text.embed_tokens.weight.detach(), vocab, group)
    head = getattr(model, "lm_head", None)
    if head is None:
        model.lm_head = ParallelLMHead(None, embedding, vocab, group)
    else:
        start = embedding.start
        rows = torch.arange(start, min(start + embedding.per_rank, vocab))
        model.lm_head = ParallelLMHead(_PadRows(take_rows(head, rows), embedding.per_rank), None, vocab, group)
    text.embed_tokens = embedding
    _localize_args(model, report)
    return report


def _text_model(model: nn.Module) -> nn.Module:
    inner = model.model  # type: ignore[attr-defined]
    return inner.language_model if hasattr(inner, "language_model") else inner


class _PadRows(nn.Module):
    """An lm_head slice padded with zero logits up to the common slice size (the last rank's may be short)."""

    def __init__(self, inner: nn.Module, rows: int) -> None:
        super().__init__()
        self.inner, self.rows = inner, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        missing = self.rows - y.shape[-1]
        return y if missing == 0 else torch.nn.functional.pad(y, (0, missing))


def _split(total: int, group: ParallelGroup, what: str) -> range:
    if total % group.world_size:
        raise UnsupportedModelError(f"{what} ({total}) must be divisible by the tensor-parallel size "
                                    f"({group.world_size})")
    start, end = group.shard_range(total)
    return range(start, end)


def _shard_attention(attn: Attention, group: ParallelGroup, report: ShardReport) -> None:
    heads, kv_heads, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    local_q = _split(heads, group, "num_attention_heads")
    if kv_heads % group.world_size == 0:
        local_kv = _split(kv_heads, group, "num_key_value_heads")
    elif group.world_size % kv_heads == 0:
        # Fewer KV heads than ranks: this rank's query heads all read one KV head, which it keeps a copy of.
        kv = group.rank * kv_heads // group.world_size
        local_kv = range(kv, kv + 1)
        report.kv_replicated = True
    else:
        raise UnsupportedModelError(f"{kv_heads} KV heads neither divide nor are divided by "
                                    f"{group.world_size} tensor-parallel ranks")
    q_rows_per_head = (attn.qkv_proj.out_features - 2 * attn.kv_size) // heads  # head_dim, or 2x with a gate
    q_total = q_rows_per_head * heads
    rows = torch.cat([
        head_rows(local_q, q_rows_per_head),
        head_rows(local_kv, hd, offset=q_total),
        head_rows(local_kv, hd, offset=q_total + attn.kv_size),
    ])
    attn.qkv_proj = take_rows(attn.qkv_proj, rows)
    attn.o_proj = take_cols(attn.o_proj, local_q.start * hd, local_q.stop * hd, keep_bias=group.rank == 0)
    attn.num_heads, attn.num_kv_heads = len(local_q), len(local_kv)
    attn.q_size, attn.kv_size = len(local_q) * hd, len(local_kv) * hd
    add_all_reduce(attn, group)
    report.attention += 1
    report.kv_heads_per_rank = len(local_kv)


def _shard_delta_net(net: nn.Module, group: ParallelGroup, report: ShardReport) -> None:
    """Qwen3-Next's Gated DeltaNet, split by key head (each with its Hv/Hk value heads)."""
    hk, hv, dk, dv = net.num_k_heads, net.num_v_heads, net.head_k_dim, net.head_v_dim
    per_k = hv // hk
    local_k = _split(hk, group, "linear_num_key_heads")
    local_v = range(local_k.start * per_k, local_k.stop * per_k)
    net.in_proj_qkvz = take_rows(net.in_proj_qkvz, head_rows(local_k, 2 * dk + 2 * per_k * dv))
    net.in_proj_ba = take_rows(net.in_proj_ba, head_rows(local_k, 2 * per_k))
    channels = torch.cat([head_rows(local_k, dk), head_rows(local_k, dk, offset=net.key_dim),
                          head_rows(local_v, dv, offset=2 * net.key_dim)])
    conv = nn.Conv1d(channels.numel(), channels.numel(), net.kernel_size, groups=channels.numel(), bias=False,
                     device="meta")
    conv.weight = nn.Parameter(net.conv1d.weight.detach()[channels].clone(), requires_grad=False)
    net.conv1d = conv
    net.dt_bias = nn.Parameter(net.dt_bias.detach()[local_v.start:local_v.stop].clone(), requires_grad=False)
    net.A_log = nn.Parameter(net.A_log.detach()[local_v.start:local_v.stop].clone(), requires_grad=False)
    net.out_proj = take_cols(net.out_proj, local_v.start * dv, local_v.stop * dv, keep_bias=group.rank == 0)
    net.num_k_heads, net.num_v_heads = len(local_k), len(local_v)
    net.key_dim, net.value_dim = len(local_k) * dk, len(local_v) * dv
    net.conv_dim = 2 * net.key_dim + net.value_dim
    add_all_reduce(net, group)
    report.linear_attention += 1


def _shard_swiglu(mlp: SwiGLU, group: ParallelGroup) -> None:
    """This rank's slice of the intermediate size; the output is a partial sum (the caller reduces it)."""
    local = _split(mlp.intermediate_size, group, "intermediate_size")
    i = mlp.intermediate_size
    rows = torch.cat([torch.arange(local.start, local.stop), torch.arange(i + local.start, i + local.stop)])
    mlp.gate_up_proj = take_rows(mlp.gate_up_proj, rows)
    mlp.down_proj = take_cols(mlp.down_proj, local.start, local.stop, keep_bias=group.rank == 0)
    mlp.intermediate_size = len(local)


def _shard_moe(moe: SparseMoE, group: ParallelGroup, expert_parallel: bool, report: ShardReport) -> None:
    experts = moe.experts
    if expert_parallel:
        local = _split(experts.num_experts, group, "num_experts")
        moe.experts = ExpertParallelExperts(_expert_block(experts, local), local.start, experts.num_experts)
    else:
        moe.experts = _experts_intermediate_slice(experts, _split(experts.intermediate_size, group,
                                                                  "moe_intermediate_size"))
    shared = getattr(moe, "shared_expert", None)
    if isinstance(shared, SwiGLU):
        _shard_swiglu(shared, group)
    report.moe += 1


def _expert_block(experts: Experts, local: range) -> Experts:
    """Experts [local) whole, full-precision or quantized."""
    block = copy.copy(experts)  # same class and attributes; the stacks are replaced below
    block._parameters, block._buffers, block._modules = dict(experts._parameters), dict(experts._buffers), \
        dict(experts._modules)
    block.num_experts = len(local)
    if isinstance(experts, QuantExperts):
        block.gate_up_proj = slice_experts_quantized(experts.gate_up_proj, local.start, local.stop)
        block.down_proj = slice_experts_quantized(experts.down_proj, local.start, local.stop)
    else:
        block.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[local.start:local.stop].clone(),
                                          requires_grad=False)
        block.down_proj = nn.Parameter(experts.down_proj.detach()[local.start:local.stop].clone(), requires_grad=False)
    return block


def _experts_intermediate_slice(experts: Experts, local: range) -> Experts:
    """Every expert, each holding this rank's slice of its intermediate size (gate_up rows, down columns)."""
    i = experts.intermediate_size
    rows = torch.cat([torch.arange(local.start, local.stop), torch.arange(i + local.start, i + local.stop)])
    block = copy.copy(experts)
    block._parameters, block._buffers, block._modules = dict(experts._parameters), dict(experts._buffers), \
        dict(experts._modules)
    block.intermediate_size = len(local)
    if isinstance(experts, QuantExperts):
        block.gate_up_proj = slice_quantized(experts.gate_up_proj, rows=rows)
        block.down_proj = slice_quantized(experts.down_proj, cols=(local.start, local.stop))
    else:
        block.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[:, rows].clone(), requires_grad=False)
        block.down_proj = nn.Parameter(experts.down_proj.detach()[:, :, local.start:local.stop].clone(),
                                       requires_grad=False)
    return block


def _localize_args(model: nn.Module, report: ShardReport) -> None:
    """A copy of the args with this rank's head counts: kv_cache_spec() then describes this rank's pool. The
    vocabulary and everything the engine validates requests against stay whole."""
    args = copy.copy(model.args)  # type: ignore[attr-defined]
    text = args
    if hasattr(args, "text"):
        args.text = text = copy.copy(args.text)
    if report.attention:
        text.num_key_value_heads = report.kv_heads_per_rank
    if report.linear_attention:
        text.linear_num_key_heads //= report.world_size
        text.linear_num_value_heads //= report.world_size
    model.args = args  # type: ignore[attr-defined]
