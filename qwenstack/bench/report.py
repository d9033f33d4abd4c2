"""A results folder of benchmark JSON files -> one Markdown report with PNG plots (`qwenstack bench report`).

Recognised files (anything else is listed with its top-level numbers):
- serve: `qwenstack bench serve --json` (has concurrency and output_throughput). Runs of the same model,
  endpoint and lengths form a series: throughput against concurrency, and TTFT/TPOT percentiles against
  concurrency.
- engine: benchmarks/bench_engine.py (decode / prefill / throughput against transformers).
- quant: benchmarks/bench_quant.py ("kind": "quant"): decode speed per weight format, with the
  bandwidth bound, and usually a quality table.
- quality: `qwenstack eval-quality --json` ("kind": "quality").
- plan: `qwenstack plan --json` ("kind": "plan").
Quality against speed is plotted per quantization level wherever a level has both a decode speed and a
quality row (their models are named on the axes: speed is often measured on a full-size shaped checkpoint,
quality on a trained model).

matplotlib is optional (`pip install matplotlib`); it runs headless (Agg), and without it the report is
written with tables only when asked (plots=False).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenstack.errors import QwenstackError

PERCENTILES = (50, 90, 99)


@dataclass
class Results:
    serve: list[dict[str, Any]] = field(default_factory=list)
    engine: list[dict[str, Any]] = field(default_factory=list)
    quant: list[dict[str, Any]] = field(default_factory=list)
    quality: list[dict[str, Any]] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def classify(record: dict[str, Any]) -> str:
    kind = record.get("kind")
    if kind in ("quant", "quality", "plan", "serve", "engine"):
        return kind
    if "concurrency" in record and "output_throughput" in record:
        return "serve"
    if any(k in record for k in ("decode", "prefill", "throughput")) and "model" in record:
        return "engine"
    return "other"


def load_results(folder: Path) -> Results:
    folder = Path(folder)
    if not folder.is_dir():
        raise QwenstackError(f"{folder} is not a folder of benchmark results")
    results = Results()
    for path in sorted(folder.rglob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            results.unreadable.append(str(path.relative_to(folder)))
            continue
        if not isinstance(record, dict):
            results.unreadable.append(str(path.relative_to(folder)))
            continue
        record["_file"] = str(path.relative_to(folder))
        getattr(results, classify(record)).append(record)
    return results


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _percent(value: Any) -> str | None:
    return None if value is None else f"{value:.0%}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_num(c) for c in row) + " |" for row in rows]
    return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise QwenstackError("plots need matplotlib: pip install matplotlib (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- sections -------------------------------------------------------------------------------------------

def _serve_series(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        label = f"{r.get('model', '?')} {r.get('endpoint', '')} in {r.get('input_len', '?')} out {r.get('output_len', '?')}"
        series[label.strip()].append(r)
    return {k: sorted(v, key=lambda r: r.get("concurrency", 0)) for k, v in series.items()}


def serve_section(runs: list[dict[str, Any]], out_dir: Path, plt: Any | None) -> list[str]:
    lines = ["## Serving: throughput and latency against concurrency", ""]
    series = _serve_series(runs)
    rows = []
    for label, group in series.items():
        for r in group:
            rows.append([label, r.get("concurrency"), r.get("completed"), r.get("output_throughput"),
                         r.get("p50_ttft_ms"), r.get("p99_ttft_ms"), r.get("p50_tpot_ms"), r.get("p99_tpot_ms"),
                         r.get("p99_e2el_ms")])
    lines += _table(["series", "concurrency", "requests", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
                     "TPOT p50 ms", "TPOT p99 ms", "E2E p99 ms"], rows)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, group in series.items():
            ax.plot([r["concurrency"] for r in group], [r["output_throughput"] for r in group], marker="o", label=label)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title("Throughput against concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, plt, out_dir / "throughput.png")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, metric, title in ((axes[0], "ttft", "Time to first token"), (axes[1], "tpot", "Time per output token")):
            for label, group in series.items():
                conc = [r["concurrency"] for r in group]
                for q, style in zip(PERCENTILES, ("-", "--", ":")):
                    values = [r.get(f"p{q}_{metric}_ms") for r in group]
                    if any(v is not None for v in values):
                        ax.plot(conc, [v if v is not None else float("nan") for v in values], style, marker="o",
                                label=f"p{q} {label}" if len(series) > 1 else f"p{q}")
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel("ms")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        _save(fig, plt, out_dir / "latency.png")
        lines += ["", "![throughput against concurrency](throughput.png)", "",
                  "![latency percentiles against concurrency](latency.png)"]
    return lines + [""]


def engine_section(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["## Engine against transformers", ""]
    rows = []
    for r in runs:
        for part in ("decode", "prefill", "throughput"):
            d = r.get(part)
            if isinstance(d, dict):
                rows.append([r.get("model"), part, d.get("ours_tok_s"), d.get("transformers_tok_s"), d.get("ratio"),
                             _percent(d.get("fraction_of_bound"))])
    return lines + _table(["model", "measure", "qwenstack tok/s", "transformers tok/s", "ratio",
                           "fraction of bandwidth bound"], rows) + [""]


def _quality_rows(results: Results) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(quality report, its level row) from quant files and standalone eval-quality files."""
    reports = [q["quality"] for q in results.quant if isinstance(q.get("quality"), dict)] + results.quality
    return [(rep, row) for rep in reports for row in rep.get("levels", [])]


def quality_section(results: Results) -> list[str]:
    rows = _quality_rows(results)
    if not rows:
        return []
    lines = ["## Quality per quantization level", ""]
    for rep in {id(r): r for r, _ in rows}.values():
        lines.append(f"{rep.get('model')}: {rep.get('dtype')} baseline; perplexity and KL over "
                     f"{_num(rep.get('text_tokens'))} held-out tokens (windows of {rep.get('context_len')}); "
                     f"greedy agreement over {rep.get('num_prompts')} prompts x {rep.get('new_tokens')} tokens, step "
                     f"by step on the baseline's continuations and free-running.")
        lines.append("")
        table = [[r.get("level"), r.get("perplexity"), f"{r.get('mean_kl', 0):.2e}", f"{r.get('top1_match', 0):.2%}",
                  f"{r['step_agreement']:.2%}" if "step_agreement" in r else "-", f"{r.get('token_agreement', 0):.2%}",
                  r.get("mean_first_divergence")]
                 for r in rep.get("levels", [])]
        lines += _table(["level", "perplexity", "mean KL (nats)", "top-1 match", "greedy agreement, step by step",
                         "free-running agreement", "first divergence"], table) + [""]
    return lines


def quant_section(results: Results, out_dir: Path, plt: Any | None) -> list[str]:
    lines = ["## Single-stream decode per weight format", ""]
    for q in results.quant:
        lines.append(f"{q.get('model')} ({q.get('_file')}): read bandwidth {_num(q.get('read_bandwidth_gb_s'))} GB/s")
        lines.append("")
        rows = [[d.get("level"), d.get("tok_s"), d.get("weight_mib_per_token"), d.get("bound_tok_s"),
                 _percent(d.get("fraction_of_bound")), d.get("planner_expected_tok_s"), d.get("vs_transformers")]
                for d in q.get("decode", [])]
        lines += _table(["level", "decode tok/s", "weights read MiB/token", "bandwidth bound tok/s",
                         "fraction of bound", "planner expected tok/s", "x transformers bf16"], rows) + [""]
    points = _quality_speed_points(results)
    if plt is not None and points:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, key, label in ((axes[0], "mean_kl", "mean KL vs baseline (nats)"),
                               (axes[1], "step_agreement", "greedy agreement, step by step")):
            for speed_model, quality_model, level, tok_s, row in points:
                ax.scatter([tok_s], [row.get(key, 0)], s=40)
                ax.annotate(level, (tok_s, row.get(key, 0)), textcoords="offset points", xytext=(5, 5), fontsize=8)
            ax.set_xlabel(f"decode tokens/s ({points[0][0]})")
            ax.set_ylabel(f"{label} ({points[0][1]})")
            ax.grid(True, alpha=0.3)
            if key == "mean_kl" and any(p[4].get("mean_kl", 0) > 0 for p in points):
                ax.set_yscale("symlog", linthresh=1e-4)
        fig.suptitle("Quality against speed per quantization level")
        _save(fig, plt, out_dir / "quality_speed.png")
        lines += ["![quality against speed per quantization level](quality_speed.png)", ""]
    return lines


def _quality_speed_points(results: Results) -> list[tuple[str, str, str, float, dict[str, Any]]]:
    speeds: dict[str, tuple[str, float]] = {}
    for q in results.quant:
        for d in q.get("decode", []):
            if d.get("tok_s") and not str(d.get("level", "")).startswith("transformers"):
                speeds[d["level"]] = (str(q.get("model")), float(d["tok_s"]))
    points = []
    for rep, row in _quality_rows(results):
        level = row.get("level")
        if level in speeds:
            model, tok_s = speeds[level]
            points.append((model, str(rep.get("model")), str(level), tok_s, row))
    return points


def plan_section(plans: list[dict[str, Any]]) -> list[str]:
    lines = ["## Plans", ""]
    rows = []
    for p in plans:
        weights = p.get("weights", {}).get(p.get("quantization"), {})
        speeds = p.get("speeds") or [{}]
        rows.append([p.get("name"), p.get("quantization"), f"{p['params']['total'] / 1e9:.2f} B",
                     f"{p['params']['active'] / 1e9:.2f} B", f"{weights.get('memory', 0) / 2**30:.1f} GiB",
                     f"{p.get('context', 0):,}", f"{p.get('kv_bytes', 0) / 2**30:.1f} GiB",
                     "yes" if p.get("fits_ram") else "no", speeds[-1].get("expected_tok_s"), p.get("measured_tok_s")])
    return lines + _table(["model", "weights", "params", "active", "weight memory", "context", "KV", "fits RAM",
                           "expected tok/s at context", "measured tok/s"], rows) + [""]


def other_section(results: Results) -> list[str]:
    if not results.other and not results.unreadable:
        return []
    lines = ["## Other files", ""]
    for r in results.other:
        scalars = {k: v for k, v in r.items() if isinstance(v, (int, float, str)) and k != "_file"}
        lines.append(f"- `{r['_file']}`: " + ", ".join(f"{k} {_num(v)}" for k, v in list(scalars.items())[:12]))
    lines += [f"- `{name}`: not a JSON object" for name in results.unreadable]
    return lines + [""]


def _save(fig: Any, plt: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(results_dir: Path, out: Path | None = None, plots: bool = True, title: str | None = None) -> Path:
    """Writes the Markdown report (default RESULTS_DIR/report.md) and its PNGs beside it; returns its path."""
    results_dir = Path(results_dir)
    results = load_results(results_dir)
    out = Path(out) if out is not None else results_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot() if plots else None
    machines = {json.dumps(r.get("machine"), sort_keys=True) for group in (results.engine, results.quant)
                for r in group if r.get("machine")}
    lines = [f"# {title or 'Benchmark report'}", "", f"From `{results_dir}`: {len(results.serve)} serving runs, "
             f"{len(results.engine)} engine runs, {len(results.quant)} quantization runs, "
             f"{len(results.quality)} quality runs, {len(results.plan)} plans.", ""]
    for m in sorted(machines):
        lines.append(f"Machine: `{m}`")
    if machines:
        lines.append("")
    if results.serve:
        lines += serve_section(results.serve, out.parent, plt)
    if results.engine:
        lines += engine_section(results.engine)
    if results.quant:
        lines += quant_section(results, out.parent, plt)
    lines += quality_section(results)
    if results.plan:
        lines += plan_section(results.plan)
    lines += other_section(results)
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out
