"""`qwenstack bench report`: a fixture results folder (serve runs at three concurrencies, an engine run, a
quantization run with its quality table, a plan, and files it does not know) -> Markdown + PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenstack.cost.bandwidth import Bandwidth
from qwenstack.bench.report import build_report, classify, load_results
from qwenstack.bench.serve import RequestResult, compute_metrics
from qwenstack.cli import main
from qwenstack.cost.planner import find_config, make_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def serve_run(concurrency: int) -> dict:
    # Latency grows with concurrency; 20 requests of 32 tokens each.
    results = [RequestResult(ok=True, start=0.0, latency=1.0 + 0.1 * concurrency + 0.01 * i, ttft=0.05 * concurrency,
                             itl=[0.03] * 31, output_tokens=32, prompt_tokens=64) for i in range(20)]
    metrics = compute_metrics(results, duration=20 / concurrency)
    return {"date": "2026-01-01T00:00:00+00:00", "base_url": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen3-0.6B",
            "endpoint": "chat", "num_prompts": 20, "concurrency": concurrency, "dataset": "random", "input_len": 64,
            "output_len": 32, "seed": 0, **metrics, "errors": []}


QUALITY = {"kind": "quality", "model": "demo-model", "dtype": "bfloat16", "context_len": 512, "text_tokens": 40000,
           "num_prompts": 16, "prompt_len": 32, "new_tokens": 64, "levels": [
               {"level": "bfloat16", "perplexity": 8.1, "mean_kl": 0.0, "top1_match": 1.0, "step_agreement": 1.0, "token_agreement": 1.0,
                "prompts_identical": 1.0, "mean_first_divergence": 64.0, "weight_bytes_per_token": 4_000_000},
               {"level": "int8", "perplexity": 8.12, "mean_kl": 2e-4, "top1_match": 0.99, "step_agreement": 0.995, "token_agreement": 0.97,
                "prompts_identical": 0.8, "mean_first_divergence": 58.0, "weight_bytes_per_token": 2_100_000},
               {"level": "int4", "perplexity": 8.6, "mean_kl": 3e-2, "top1_match": 0.9, "step_agreement": 0.9, "token_agreement": 0.6,
                "prompts_identical": 0.1, "mean_first_divergence": 20.0, "weight_bytes_per_token": 1_200_000}]}
QUANT = {"kind": "quant", "model": "qwen3-0.6b", "machine": {"threads": 16}, "read_bandwidth_gb_s": 40.0,
         "decode_tokens": 48, "prompt_tokens": 16, "quality": QUALITY, "decode": [
             {"level": "bfloat16", "tok_s": 20.0, "weight_mib_per_token": 1136.9, "bound_tok_s": 33.5,
              "fraction_of_bound": 0.6, "planner_expected_tok_s": 22.0, "vs_transformers": 1.4},
             {"level": "int8", "tok_s": 38.0, "weight_mib_per_token": 569.4, "bound_tok_s": 67.0,
              "fraction_of_bound": 0.57, "planner_expected_tok_s": 41.0, "vs_transformers": 2.7},
             {"level": "int4", "tok_s": 45.0, "weight_mib_per_token": 302.1, "bound_tok_s": 126.0,
              "fraction_of_bound": 0.36, "planner_expected_tok_s": 50.0, "vs_transformers": 3.2},
             {"level": "transformers-bf16", "tok_s": 14.0}]}
ENGINE = {"machine": {"threads": 16}, "model": "qwen3-0.6b", "weight_bytes_per_token": 1192099840,
          "decode": {"ours_tok_s": 20.0, "transformers_tok_s": 14.0, "ratio": 1.43, "fraction_of_bound": 0.6},
          "prefill": {"ours_tok_s": 900.0, "transformers_tok_s": 700.0, "ratio": 1.29}}


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    (folder / "serve").mkdir(parents=True)
    for c in (1, 4, 16):
        (folder / "serve" / f"serve-c{c}.json").write_text(json.dumps(serve_run(c)))
    (folder / "engine-qwen3-0.6b.json").write_text(json.dumps(ENGINE))
    (folder / "quant-qwen3-0.6b.json").write_text(json.dumps(QUANT))
    plan = make_plan(find_config("Qwen/Qwen3-235B-A22B"), 262144, 1, "int4",
                     bandwidth=Bandwidth("cpu", 20e9, {"int4": 12e9}))
    (folder / "plan-235b.json").write_text(json.dumps(plan.to_dict(), default=str))
    (folder / "notes.json").write_text(json.dumps({"cpu": "test", "score": 1.5}))
    (folder / "broken.json").write_text("[1, 2")
    return folder


def test_files_are_recognised(results_dir: Path) -> None:
    results = load_results(results_dir)
    assert [len(x) for x in (results.serve, results.engine, results.quant, results.plan, results.other)] == [3, 1, 1, 1, 1]
    assert results.unreadable == ["broken.json"]
    assert classify(QUALITY) == "quality"


def test_report_has_tables_and_plots(results_dir: Path, tmp_path: Path) -> None:
    out = build_report(results_dir, tmp_path / "site" / "report.md", title="Fixture")
    text = out.read_text()
    assert text.startswith("# Fixture")
    for heading in ("## Serving: throughput and latency", "## Engine against transformers",
                    "## Single-stream decode per weight format", "## Quality per quantization level", "## Plans",
                    "## Other files"):
        assert heading in text, heading
    assert "| Qwen/Qwen3-0.6B chat in 64 out 32 | 16 |" in text
    assert "| int8 | 38.00 | 569.40 | 67.00 | 57% | 41.00 | 2.70 |" in text
    assert "| int8 | 8.12 | 2.00e-04 | 99.00% | 99.50% | 97.00% |" in text
    assert "| Qwen/Qwen3-235B-A22B | int4 | 235.09 B | 22.19 B |" in text
    assert "`broken.json`: not a JSON object" in text and "score 1.50" in text
    for name in ("throughput.png", "latency.png", "quality_speed.png"):
        png = out.parent / name
        assert f"]({name})" in text
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_bench_report_command(results_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "report", str(results_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(results_dir / "report.md")
    assert (results_dir / "throughput.png").is_file()
    tables_only = results_dir / "tables" / "report.md"
    assert main(["bench", "report", str(results_dir), "--out", str(tables_only), "--no-plots"]) == 0
    assert "png" not in tables_only.read_text() and not list(tables_only.parent.glob("*.png"))
    assert main(["bench", "report", str(results_dir / "missing")]) == 1
