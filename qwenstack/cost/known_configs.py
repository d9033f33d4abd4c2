"""Published Qwen3 configurations, for planning without a download (`qwenstack plan Qwen/Qwen3-235B-A22B`).

Values are those of the released config.json files as collected in shared/reference/qwen3-family.md
(sections 2-4). A config.json found on disk or in the Hugging Face cache always wins over this table;
the planner says which it used.

One entry is not a release: `qwen3-1t-hypothetical`. Qwen3-Max (over a trillion parameters, 262,144
tokens of context) has no published architecture, so to answer "what would a trillion-parameter Qwen3
need?" we scale the Qwen3-MoE layout: Qwen3-235B-A22B's depth (94 layers) and expert recipe (top-8,
no shared expert, softmax router), Qwen3-Coder-480B-A35B's width (hidden 6144, 96 query / 8 key-value
heads of 128), 224 experts of intermediate size 2560 per layer, and a 262,144-token context. That is
1.011 T parameters, 52.9 B active per token. Every figure the planner derives from it is an estimate for
a model of that shape, not for Qwen3-Max.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_QWEN3 = dict(vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=40960, hidden_act="silu",
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643,
              eos_token_id=151645, attention_bias=False, head_dim=128, dtype="bfloat16")


def _dense(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> dict[str, Any]:
    return dict(_QWEN3, model_type="qwen3", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie)


def _moe(hidden: int, layers: int, heads: int, kv: int, experts: int, top_k: int, moe_inter: int,
         dense_inter: int, **extra: Any) -> dict[str, Any]:
    return dict(_QWEN3, model_type="qwen3_moe", hidden_size=hidden, intermediate_size=dense_inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                moe_intermediate_size=moe_inter, num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[], **extra)


_NEXT_80B = dict(
    _QWEN3, model_type="qwen3_next", hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, tie_word_embeddings=False,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=512, num_experts_per_tok=10,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], linear_conv_kernel_dim=4,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
    full_attention_interval=4, max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
)

# name (lower case, without the "Qwen/" prefix) -> config.json values
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _dense(1024, 3072, 28, 16, 8, tie=True),
    "qwen3-1.7b": _dense(2048, 6144, 28, 16, 8, tie=True),
    "qwen3-4b": _dense(2560, 9728, 36, 32, 8, tie=True),
    "qwen3-8b": _dense(4096, 12288, 36, 32, 8, tie=False),
    "qwen3-14b": _dense(5120, 17408, 40, 40, 8, tie=False),
    "qwen3-32b": _dense(5120, 25600, 64, 64, 8, tie=False),
    "qwen3-30b-a3b": _moe(2048, 48, 32, 4, 128, 8, 768, 6144),
    "qwen3-235b-a22b": _moe(4096, 94, 64, 4, 128, 8, 1536, 12288),
    # The 2507 releases: the same architectures with a 262,144-token native context.
    "qwen3-30b-a3b-instruct-2507": _moe(2048, 48, 32, 4, 128, 8, 768, 6144, max_position_embeddings=262144),
    "qwen3-30b-a3b-thinking-2507": _moe(2048, 48, 32, 4, 128, 8, 768, 6144, max_position_embeddings=262144),
    "qwen3-235b-a22b-instruct-2507": _moe(4096, 94, 64, 4, 128, 8, 1536, 12288, max_position_embeddings=262144),
    "qwen3-235b-a22b-thinking-2507": _moe(4096, 94, 64, 4, 128, 8, 1536, 12288, max_position_embeddings=262144),
    "qwen3-next-80b-a3b-instruct": _NEXT_80B,
    "qwen3-next-80b-a3b-thinking": _NEXT_80B,
    "qwen3-1t-hypothetical": _moe(6144, 94, 96, 8, 224, 8, 2560, 16384, max_position_embeddings=262144),
}
ALIASES = {"qwen3-next-80b-a3b": "qwen3-next-80b-a3b-instruct", "qwen3-max-hypothetical": "qwen3-1t-hypothetical",
           "qwen3-1t": "qwen3-1t-hypothetical"}
HYPOTHETICAL = {
    "qwen3-1t-hypothetical": (
        "HYPOTHETICAL: Qwen3-Max's architecture is unpublished. This is a 1-trillion-parameter Qwen3-MoE "
        "scaled from Qwen3-235B-A22B (94 layers, top-8 of 224 experts, hidden 6144, 96/8 heads; see "
        "qwenstack/cost/known_configs.py); its figures describe that shape, not Qwen3-Max."),
}


def known_config(name: str) -> tuple[str, dict[str, Any]] | None:
    """(canonical name, config) for a published name such as 'Qwen/Qwen3-235B-A22B', else None."""
    key = name.strip().lower()
    key = key.split("/", 1)[1] if key.startswith("qwen/") else key
    key = ALIASES.get(key, key)
    if key not in KNOWN_CONFIGS:
        return None
    return key, dict(KNOWN_CONFIGS[key])


# --- hardware for parallel plans (`qwenstack plan MODEL --gpus 8xH200`, `--cpus 4`) --------------------
#
# Assumptions, each with its source; none was measured by qwenstack (no such machine was at hand).
# - Memory sizes and HBM read bandwidths are the vendors' datasheet figures (decimal GB, TB/s): H200 SXM
#   141 GB at 4.8 TB/s; H100 SXM 80 GB at 3.35 TB/s; A100 80GB SXM 2.039 TB/s, 40GB 1.555 TB/s; L40S 48 GB
#   at 864 GB/s; RTX 4090 24 GB at 1,008 GB/s; RTX 3090 24 GB at 936 GB/s; L4 24 GB at 300 GB/s. The peak
#   is the planner's bound: no decode kernel reads HBM faster.
# - NVLink 4 (H100/H200 SXM, "900 GB/s" both directions together) is 450 GB/s per direction on the line;
#   NCCL's protocol overhead (~20%) leaves ~370 GB/s of effective bus bandwidth (S. Jeaugey, NCCL
#   maintainer, NVIDIA/nccl-tests#212). NVLink 3 (A100 SXM, "600 GB/s") scaled the same way: 240 GB/s.
# - PCIe Gen4 x16 is 32 GB/s per direction on the line, ~25 GB/s in practice (the figure the image planner
#   uses for host transfers); GPUs without NVLink (L40S, RTX 4090, L4; the 3090's 2-way bridge is ignored)
#   all-reduce through it.
# - Latency: a small NCCL all-reduce costs ~6 us on 2 H100s over NVLink (NVIDIA/nccl#1259, nccl-tests with
#   CUDA graphs) and NCCL's low-latency protocol adds ~1 us per ring hop (Hu et al., "Demystifying NCCL",
#   arXiv 2507.04786). Modelled as 4 us per collective + 1 us per hop, so 2 ranks give 4 + 2 x 1 = 6 us.
#   PCIe is given the same latency (no measurement found): at decode sizes (kilobytes) it is the latency
#   that counts, the bandwidth term is a few percent.
# - CPU nodes talk over TCP (gloo). Ethernet line rates are exact (10/25/100 Gbit/s), taken at 90% for
#   TCP; the latency, ~25 us per message hop plus ~30 us per collective for gloo's bookkeeping, is an
#   UNVERIFIED estimate of kernel-TCP round trips in one data-centre rack. "loopback" is several ranks on one
#   machine (what benchmarks/bench_tp.py measures): its figures come from that benchmark's gloo timings.

@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth: float  # bytes per second per direction, effective
    hop_latency_s: float  # per ring step of a collective
    call_latency_s: float  # fixed cost of one collective (launch, synchronisation)
    source: str


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory: float  # bytes
    hbm: float  # bytes per second, read
    link: str  # key of INTERCONNECTS


_NCCL_LATENCY = dict(hop_latency_s=1e-6, call_latency_s=4e-6)
INTERCONNECTS: dict[str, Interconnect] = {i.name: i for i in (
    Interconnect("nvlink4", 370e9, source="NVLink 4, 450 GB/s line, ~370 GB/s NCCL busBw (NVIDIA/nccl-tests#212)",
                 **_NCCL_LATENCY),
    Interconnect("nvlink3", 240e9, source="NVLink 3, 300 GB/s line per direction, ~80% effective (as NVLink 4)",
                 **_NCCL_LATENCY),
    Interconnect("pcie4", 25e9, source="PCIe Gen4 x16, 32 GB/s line per direction, ~25 GB/s in practice",
                 **_NCCL_LATENCY),
    Interconnect("10gbe", 10e9 / 8 * 0.9, 25e-6, 30e-6, "10 Gbit/s Ethernet, TCP at 90%; latency UNVERIFIED"),
    Interconnect("25gbe", 25e9 / 8 * 0.9, 25e-6, 30e-6, "25 Gbit/s Ethernet, TCP at 90%; latency UNVERIFIED"),
    Interconnect("100gbe", 100e9 / 8 * 0.9, 25e-6, 30e-6, "100 Gbit/s Ethernet, TCP at 90%; latency UNVERIFIED"),
)}
GPU_SPECS: dict[str, GpuSpec] = {g.name.lower(): g for g in (
    GpuSpec("H200", 141e9, 4.8e12, "nvlink4"), GpuSpec("H100", 80e9, 3.35e12, "nvlink4"),
    GpuSpec("A100-80GB", 80e9, 2.039e12, "nvlink3"), GpuSpec("A100-40GB", 40e9, 1.555e12, "nvlink3"),
    GpuSpec("L40S", 48e9, 864e9, "pcie4"), GpuSpec("RTX-4090", 24e9, 1008e9, "pcie4"),
    GpuSpec("RTX-3090", 24e9, 936e9, "pcie4"), GpuSpec("L4", 24e9, 300e9, "pcie4"),
)}
# Of each GPU's memory, the share planned for weights and KV cache; the rest is the CUDA context,
# activations and the allocator's slack (vLLM's default gpu_memory_utilization is the same 0.9).
GPU_MEMORY_UTILIZATION = 0.9
# Of a CPU node's RAM, the same share (the OS and the Python process take the rest).
CPU_MEMORY_UTILIZATION = 0.9


def parse_gpus(spec: str) -> tuple[int, GpuSpec]:
    """'8xH200' -> (8, H200); 'H100' -> (1, H100)."""
    count, sep, name = spec.strip().partition("x") if spec[:1].isdigit() else ("1", "x", spec.strip())
    gpu = GPU_SPECS.get(name.lower())
    if not sep or not count.isdigit() or int(count) < 1 or gpu is None:
        raise ValueError(f"--gpus wants COUNTxNAME such as 8xH200, with NAME one of "
                         f"{', '.join(g.name for g in GPU_SPECS.values())}; got {spec!r}")
    return int(count), gpu
