"""`qwenstack bench report RESULTS_DIR`: benchmark JSON files -> a Markdown report with PNG plots."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwenstack.commands import Command

EPILOG = """examples:
  qwenstack bench report benchmarks/out                      # writes benchmarks/out/report.md + PNGs
  qwenstack bench report results/ --out docs/bench/report.md --title "Qwen3-0.6B on a 16-core Xeon"

Reads every *.json under RESULTS_DIR: `bench serve --json` runs (throughput and latency percentiles
against concurrency), benchmarks/bench_engine.py and bench_quant.py outputs (decode per weight format,
quality against speed), `eval-quality --json` and `plan --json`. The PNGs are written beside the report.
Plots need matplotlib (pip install matplotlib)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("results_dir", type=Path, help="folder of benchmark JSON files")
    parser.add_argument("--out", type=Path, default=None, help="the report (default: RESULTS_DIR/report.md)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")


def run(args: argparse.Namespace) -> int:
    from qwenstack.bench.report import build_report

    path = build_report(args.results_dir, args.out, plots=not args.no_plots, title=args.title)
    print(path)
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    if pngs:
        print(f"plots: {', '.join(pngs)}", file=sys.stderr)
    return 0


COMMANDS = [Command("report", "Turn a folder of benchmark JSON results into a Markdown report with plots",
                    add_arguments, run, group="bench")]
