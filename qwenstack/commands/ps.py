"""`qwenstack ps`: what a running server has loaded (as `ollama ps`): each model's device, weight and KV-cache
memory, KV use and queue, read from the server's GET /api/ps."""
from __future__ import annotations

import argparse
import json
import os
import sys

from qwenstack.commands import Command
from qwenstack.commands._common import human_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    parser.add_argument("--api-key", default=None, help="bearer key (default: $QWENSTACK_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the server's answer as JSON")


def fetch_status(base_url: str, api_key: str | None) -> dict:
    import httpx

    url = base_url.rstrip("/").removesuffix("/v1") + "/api/ps"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url, headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def kv_kind(model: dict) -> str:
    """", float8_e5m2" where the KV cache is not in the weights' dtype (--kv-cache-dtype fp8); "" otherwise (or from
    a server that does not say)."""
    dtype = model.get("kv_cache_dtype")
    return f", {dtype}" if dtype and dtype != model["dtype"] else ""


def run(args: argparse.Namespace) -> int:
    import httpx

    api_key = args.api_key or os.environ.get("QWENSTACK_API_KEY")
    try:
        status = fetch_status(args.base_url, api_key)
    except httpx.HTTPStatusError as exc:  # it answered: say what it said, not that nothing is there
        refused = exc.response.status_code == 401
        print(f"qwenstack ps: the server at {args.base_url} " + (
            "refused the API key: pass --api-key or set QWENSTACK_API_KEY" if refused else f"answered {exc}"),
            file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"qwenstack ps: no answer from a qwenstack server at {args.base_url} ({exc}); "
              "start one with `qwenstack serve`", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rows = [("NAME", "DEVICE", "WEIGHTS", "KV CACHE (used/total)", "CONTEXT", "RUNNING", "WAITING")]
    for m in status["models"]:
        kind = m["dtype"] + (f", {m['quantization']}" if m.get("quantization") else "")
        rows.append((m["name"], f"{m['device']} ({kind})", human_size(m["weights_bytes"]),
                     f"{human_size(m['kv_cache_used_bytes'])} / {human_size(m['kv_cache_bytes'])} "
                     f"({100 * m['kv_usage']:.0f}%{kv_kind(m)})", str(m["max_model_len"]), str(m["running"]),
                     str(m["waiting"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for name in status.get("loading", []):
        print(f"{name}: loading")
    if status.get("process_resident_bytes"):
        print(f"\nserver process memory (resident): {human_size(status['process_resident_bytes'])}")
    return 0


COMMANDS = [Command("ps", "Show what a running server has loaded: memory and KV-cache use",
                    add_arguments, run, order=36)]
