"""`qwenstack run-batch -i requests.jsonl -o results.jsonl [MODEL ...]`: a file of OpenAI batch requests answered
offline, through the same app `qwenstack serve` runs (qwenstack.serving.batch), as vLLM's run-batch.

Models and engine options are serve's; nothing listens on a port. Unlike the server's 512-token step on CPU
(which keeps streams' latency low), a batch takes 2,048 prompt tokens a step unless told otherwise: nobody waits
on a stream, so throughput is all that counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import IO

from qwenstack.commands import Command
from qwenstack.commands._common import positive_int
from qwenstack.commands.serve import add_arguments as add_serve_arguments
from qwenstack.commands.serve import add_model_arguments, add_no_think_option, add_vllm_arguments

EPILOG = """examples:
  qwenstack run-batch -i requests.jsonl -o results.jsonl Qwen/Qwen3-0.6B
  cat requests.jsonl | qwenstack run-batch -i - -o - ./Qwen3-Embedding-0.6B

Each input line: {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}, for any
JSON route the server has (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/rerank,
...). Each output line, in input order: {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}. A bad line becomes an error line; the batch goes on. Exit status 0 when every line got a 2xx."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("-i", "--input-file", required=True, metavar="FILE",
                        help="the requests, one JSON object a line (- for standard input)")
    parser.add_argument("-o", "--output-file", required=True, metavar="FILE",
                        help="where the results go, one JSON object a line (- for standard output)")
    parser.add_argument("--max-concurrency", type=positive_int, default=256, metavar="N",
                        help="requests in flight at once (default: 256; the engine batches them)")
    add_no_think_option(parser)
    add_model_arguments(parser, "answer with")
    add_vllm_arguments(parser)
    # The server's other options keep their defaults: serve_config_from_args reads them all.
    serve = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(serve)
    own = {action.dest for action in parser._actions}
    parser.set_defaults(**{key: value for key, value in vars(serve.parse_args([])).items() if key not in own})


def _open(path: str, mode: str) -> IO[str]:
    if path == "-":
        return sys.stdin if "r" in mode else sys.stdout
    return open(path, mode, encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from qwenstack.commands.serve import serve_config_from_args, server_config, vllm_notes
    from qwenstack.engine.engine import DEFAULT_STEP_TOKENS
    from qwenstack.serving.app import create_app
    from qwenstack.serving.batch import run_batch

    for note in vllm_notes(args):
        print(f"note: {note}", file=sys.stderr)
    values = serve_config_from_args(args)
    values.update(enable_ui=False, api_key=None)  # in-process: no key to present ($QWENSTACK_API_KEY included)
    for spec in values["models"]:
        spec.setdefault("max_num_batched_tokens", DEFAULT_STEP_TOKENS)
    config = server_config(values)  # no MODEL: serve_config_from_args gives the demo model
    source = _open(args.input_file, "r")
    sink = _open(args.output_file, "w")

    def write(line: dict) -> None:
        sink.write(json.dumps(line, ensure_ascii=False) + "\n")
        sink.flush()

    try:
        summary = asyncio.run(run_batch(create_app(None, config), source, write,
                                        max_concurrency=args.max_concurrency))
    finally:
        for stream in (source, sink):
            if stream not in (sys.stdin, sys.stdout):
                stream.close()
    print(f"{summary.lines} requests: {summary.succeeded} succeeded, {summary.failed} failed, "
          f"in {summary.seconds:.1f} s", file=sys.stderr)
    return 0 if summary.failed == 0 else 1


COMMANDS = [Command("run-batch", "Answer a file of OpenAI batch requests offline (as vLLM's run-batch)",
                    add_arguments, run, order=15)]
