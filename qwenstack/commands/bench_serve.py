"""`qwenstack bench serve`: load-test a running OpenAI-compatible server (see qwenstack.bench.serve)."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from pathlib import Path

from qwenstack.commands import Command
from qwenstack.commands._common import positive_int

EPILOG = """examples:
  qwenstack bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --concurrency 16 \\
      --input-len 512 --output-len 128 --json results.json
  qwenstack bench serve --model Qwen/Qwen3-0.6B --dataset prompts.jsonl --endpoint completions

Each request streams and asks for exactly --output-len tokens (max_tokens plus ignore_eos: true).
A JSONL dataset has one {"prompt": "..."} or {"messages": [...]} per line (optional "output_len")."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                        help="/v1/chat/completions or /v1/completions (default: chat)")
    parser.add_argument("--num-prompts", type=positive_int, default=100, help="requests to send (default: 100)")
    parser.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (default: 8)")
    parser.add_argument("--dataset", default="random", metavar="random|FILE.jsonl",
                        help="random words, or a JSONL file of prompts (default: random)")
    parser.add_argument("--input-len", type=positive_int, default=256, help="random prompt length in tokens")
    parser.add_argument("--output-len", type=positive_int, default=128, help="tokens generated per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random workload (default: 0)")
    parser.add_argument("--temperature", type=float, default=None, help="sent with each request if given")
    parser.add_argument("--api-key", default=None, help="bearer key (default: $QWENSTACK_API_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from qwenstack.bench.serve import (BenchSpec, compute_metrics, first_model, format_table, jsonl_requests,
                                       random_requests, run_benchmark)

    api_key = args.api_key or os.environ.get("QWENSTACK_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if args.dataset == "random":
        requests = random_requests(args.num_prompts, args.input_len, args.output_len, args.seed)
    else:
        requests = jsonl_requests(Path(args.dataset), args.num_prompts, args.output_len)
    model = args.model or asyncio.run(first_model(args.base_url, api_key))
    spec = BenchSpec(args.base_url, model, args.concurrency, args.endpoint, api_key, args.temperature,
                     timeout_s=args.timeout)
    print(f"Benchmarking {model} at {spec.api_root}: {len(requests)} requests, {args.concurrency} concurrent, "
          f"dataset {args.dataset}", file=sys.stderr)
    results, duration = asyncio.run(run_benchmark(spec, requests))
    metrics = compute_metrics(results, duration, requests)
    print(format_table(metrics))
    errors = [r.error for r in results if not r.ok and r.error]
    for error in errors[:5]:
        print(f"failed: {error}", file=sys.stderr)
    if args.json is not None:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "base_url": spec.api_root, "model": model, "endpoint": args.endpoint, "num_prompts": len(requests),
            "concurrency": args.concurrency, "dataset": args.dataset, "input_len": args.input_len,
            "output_len": args.output_len, "seed": args.seed, **metrics, "errors": errors[:20],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if metrics["completed"] else 1


COMMANDS = [Command("serve", "Load-test an OpenAI-compatible server: throughput, TTFT, TPOT, ITL",
                    add_arguments, run, group="bench")]
