"""The text `qwenstack plan` prints for a Plan (kept apart from the arithmetic in qwenstack.cost.planner)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenstack.cost.parallel import ParallelPlan
    from qwenstack.cost.planner import Plan, SpeedEstimate

PARTS = ("embedding", "lm_head", "attention", "linear_attention", "mlp", "experts", "shared_expert", "router",
         "norms", "other")


def size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _speed_rows(speeds: list["SpeedEstimate"]) -> list[str]:
    rows = [f"  {'context':>12}  {'read per token':>15}  {'bound':>12}  {'expected':>12}"]
    for s in speeds:
        rows.append(f"  {s.context:>12,}  {size(s.bytes_per_token):>15}  {s.bound_tok_s:>8.2f} t/s  "
                    f"{s.expected_tok_s:>8.2f} t/s")
    return rows


def format_plan(plan: "Plan") -> str:
    p = plan.params
    lines = [f"{plan.name}  ({plan.model_type}; config from {plan.origin})"]
    if plan.note:
        lines.append(f"NOTE: {plan.note}")
    lines.append("")
    moe = ""
    if p.active != p.total:
        moe = " (MoE: only the routed experts count as active)"
    lines.append(f"Parameters: {count(p.total)} total, {count(p.active)} active per token{moe}")
    parts = [f"{k} {count(p.breakdown[k])}" for k in PARTS if p.breakdown.get(k)]
    tied = " (lm_head tied to the embedding)" if not p.lm_head else ""
    lines.append(f"  {', '.join(parts)}{tied}")
    lines.append("")
    lines.append(f"Weights ({plan.act_dtype} activations){'':8}{'memory':>12}  {'read per token':>15}")
    for fmt, w in plan.weights.items():
        mark = "  <- planned" if fmt == plan.quantization else ""
        lines.append(f"  {fmt:<34}{size(w.memory):>12}  {size(w.read_per_token):>15}{mark}")
    lines.append("")
    lines.append(f"KV cache: {size(plan.kv_bytes_per_token)} per token ({plan.kv_dtype}, full-attention layers); "
                 f"{plan.context:,} tokens x {plan.concurrency} sequence{'s' if plan.concurrency > 1 else ''} "
                 f"= {size(plan.kv_bytes)}")
    if plan.state_bytes_per_sequence:
        lines.append(f"Linear-attention state: {size(plan.state_bytes_per_sequence)} per sequence (fixed, any "
                     f"context) = {size(plan.state_bytes_per_sequence * plan.concurrency)}")
    if plan.max_position_embeddings and plan.context > plan.max_position_embeddings:
        lines.append(f"WARNING: this config allows {plan.max_position_embeddings:,} positions; {plan.context:,} "
                     f"needs a longer-context release (e.g. the 2507 models) or YaRN rope scaling.")
    lines.append("")
    weights = plan.weights[plan.quantization].memory
    extra = f" + state {size(plan.state_bytes_per_sequence * plan.concurrency)}" if plan.state_bytes_per_sequence else ""
    lines.append(f"Memory needed: {size(plan.needed_bytes)} ({plan.quantization} weights {size(weights)} + "
                 f"KV {size(plan.kv_bytes)}{extra}; activations not included)")
    mem = plan.memory
    verdict = "fits" if plan.fits_ram() else f"does NOT fit ({plan.needed_bytes / mem.ram_total:.1f}x the RAM)"
    if plan.fits_ram() and plan.needed_bytes > mem.ram_available:
        verdict = "fits the RAM, but not what is free right now"
    lines.append(f"This machine: RAM {size(mem.ram_total)} ({size(mem.ram_available)} available): {verdict}")
    for gpu in mem.gpus:
        ok = "fits" if plan.needed_bytes <= gpu["total"] else f"does NOT fit ({plan.needed_bytes / gpu['total']:.1f}x)"
        lines.append(f"GPU {gpu['name']}: {size(gpu['total'])} ({size(gpu['free'])} free): {ok}")
    if not mem.gpus:
        lines.append("GPU: none found (torch.cuda)")
    if plan.bandwidth is not None:
        lines.append("")
        lines.append(f"Single-stream decode on this CPU, {plan.quantization} weights "
                     f"(bound: stream bandwidth; expected: measured decode-kernel rates)")
        lines.append(f"  {plan.bandwidth.describe()}")
        lines.extend(_speed_rows(plan.speeds))
    if plan.gpu_speeds and plan.gpu_bandwidth is not None:
        lines.append(f"Single-stream decode on {plan.gpu_bandwidth.device} (bound only: "
                     f"{plan.gpu_bandwidth.stream / 1e9:.0f} GB/s stream read)")
        lines.extend(_speed_rows(plan.gpu_speeds))
    if plan.measured_tok_s is not None:
        lines.append(f"Measured here: {plan.measured_tok_s:.2f} tokens/s at {plan.measured_context} tokens of context "
                     f"(the engine, greedy, {plan.quantization} weights)")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def format_parallel(plan: "ParallelPlan") -> str:
    """The layout table `qwenstack plan MODEL --gpus 8xH200` (or --cpus N) prints."""
    c = plan.cluster
    link = c.link
    lines = [f"{plan.name} on {c.describe()}: {plan.quantization} weights, {plan.kv_dtype} KV, "
             f"{plan.context:,} tokens x {plan.concurrency} sequence{'s' if plan.concurrency > 1 else ''}"]
    if plan.note:
        lines.append(f"NOTE: {plan.note}")
    rate = (f"memory read {c.bandwidth.stream / 1e9:,.0f} GB/s ({c.bandwidth.source})" if c.kind == "gpu" else
            f"this CPU's measured rates: {c.bandwidth.describe()}")
    lines.append(f"  per device: {size(c.memory)}, {c.usable:.0%} planned for weights + KV = "
                 f"{size(c.usable_bytes)}; {rate}")
    lines.append(f"  link: {link.name} ({link.source}): a collective costs {_ms(link.call_latency_s)} + "
                 f"{_ms(link.hop_latency_s)} per hop + bytes / {link.bandwidth / 1e9:,.1f} GB/s "
                 f"(assumptions: qwenstack/cost/known_configs.py)")
    lines.append("")
    ctx = f"at {plan.context:,}"
    lines.append(f"  {'layout':<10}{'weights/rank':>14}{'KV/rank':>12}{'total/rank':>13}  {'fits':<5}"
                 f"{'comm/token':>12}{'bound ' + ctx:>22}{'expected':>14}")
    refused: set[tuple[int, str]] = set()
    for o in plan.options:
        if o.problem:
            if (o.tensor_parallel, o.problem) not in refused:  # one line per reason, not one per EP variant
                lines.append(f"  {o.label:<10}  cannot be built: {o.problem}")
            refused.add((o.tensor_parallel, o.problem))
            continue
        assert o.weights is not None and o.comm is not None
        full = o.speeds[-1]
        lines.append(f"  {o.label:<10}{size(o.weights.memory):>14}{size(o.kv_bytes + o.state_bytes):>12}"
                     f"{size(o.needed_bytes):>13}  {'yes' if o.fits else 'NO':<5}{_ms(o.comm.seconds):>12}"
                     f"{full.bound_tok_s:>18.2f} t/s{full.expected_tok_s:>10.2f} t/s")
    lines.append("")
    best = plan.smallest
    if best is None:
        built = [o for o in plan.options if not o.problem]
        least = min(built, key=lambda o: o.needed_bytes) if built else None
        need = f": the smallest per-rank need is {size(least.needed_bytes)} ({least.label})" if least else ""
        lines.append(f"Does NOT fit on {c.describe()} at any layout{need}, over the {size(c.usable_bytes)} usable "
                     f"per device. More devices, a smaller format (--quantization) or less context would.")
        return "\n".join(lines)
    assert best.comm is not None
    flags = f"--tensor-parallel-size {best.tensor_parallel}" + (" --expert-parallel" if best.expert_parallel else "")
    if plan.replicas > 1:
        flags += f" --data-parallel-size {plan.replicas}"
    lines.append(f"Smallest layout that fits: {best.label}, {size(best.needed_bytes)} per rank of "
                 f"{size(c.usable_bytes)} usable; {plan.replicas} replica{'s' if plan.replicas > 1 else ''} "
                 f"on {c.count} device{'s' if c.count > 1 else ''}")
    lines.append(f"  qwenstack serve MODEL {flags}")
    comm = best.comm
    if best.tensor_parallel > 1:
        share = comm.seconds * best.speeds[-1].expected_tok_s
        lines.append(f"  communication per token: {comm.all_reduces} all-reduces of {size(comm.all_reduce_bytes)} "
                     f"({_ms(comm.all_reduce_seconds)}), the logits all-gather of {size(comm.gather_bytes)} per rank "
                     f"({_ms(comm.gather_seconds)}), the step broadcast ({_ms(comm.broadcast_seconds)}): "
                     f"{_ms(comm.seconds)}, {share:.0%} of the expected step")
        if comm.all_to_all_bytes:
            lines.append(f"  (a dispatch-based EP would send {size(comm.all_to_all_bytes)} per token in all-to-alls "
                         f"instead of the MoE all-reduces; qwenstack's EP keeps the router on every rank and "
                         f"all-reduces)")
    lines.append(f"Single-stream decode per replica (bound: memory read of the slowest rank, no communication; "
                 f"expected: {'kernel rates + step overhead' if c.kind == 'cpu' else 'the same read'} + "
                 f"communication)")
    lines.extend(_speed_rows(best.speeds))
    return "\n".join(lines)
