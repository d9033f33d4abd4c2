"""The 2-minute soak (benchmarks/soak.py) as a slow test: a server subprocess under a steady mix of valid,
invalid and aborted requests; every request answered as it should be, the KV pool idle at the end, and
resident memory flat between the first and the last 30 s. (Latency is reported, not asserted: on a shared
machine it moves with the neighbours' load; the 30-minute figures are in benchmarks/RESULTS.md.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_two_minute_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--duration", "120", "--window", "30", "--warmup", "15",
                          "--sample", "5", "--out", str(out)], capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    assert run.returncode == 0, (run.stdout[-3000:], result["problems"])
    assert result["num_problems"] == 0 and result["counts"]["kv_idle_at_end"] == 1
    assert min(result["counts"][k] for k in ("valid", "invalid", "aborted")) > 20
    assert abs(result["last_over_first"]["rss_mib"] - 1) <= 0.10, result["last_over_first"]
