"""The text `qwenstack plan` prints for a Plan (kept apart from the arithmetic in qwenstack.cost.planner)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    lines.append(f"KV cache: {size(plan.kv_bytes_per_token)} per token ({plan.act_dtype}, full-attention layers); "
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
