"""`qwenstack pull MODEL`: download a Hugging Face model into the local cache, as `ollama pull` does.

Decisions:
- The files a runtime reads (resolve.ALLOW_PATTERNS: config, tokenizer, safetensors; never .bin duplicates),
  into the ordinary Hugging Face cache, so `qwenstack serve/chat MODEL` and every other HF tool find them.
- The size is shown before anything is fetched (a dry run lists each file and whether it is cached), with
  the destination; a dry run costs a few small requests.
- Resumable (qwenstack/hub_download.py): a partial file is continued with a Range request, so an
  interrupted pull picks up where it stopped; files already cached are not fetched again.
- The hub address is read at call time (HF_ENDPOINT), so a mirror, or the tests' local fake hub, works.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwenstack.commands import Command
from qwenstack.commands._common import human_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model id, e.g. Qwen/Qwen3-0.6B")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")


def run(args: argparse.Namespace) -> int:
    from qwenstack.commands.models import cache_dir
    from qwenstack.hub_download import plan_pull, pull
    from qwenstack.resolve import ALLOW_PATTERNS, is_offline

    name = args.model
    if name.count("/") != 1 or Path(name).expanduser().exists():
        print(f"qwenstack pull: '{name}' is not a Hugging Face model id (org/name)", file=sys.stderr)
        return 1
    if is_offline():
        print("qwenstack pull: offline mode is on (HF_HUB_OFFLINE or QWENSTACK_OFFLINE); nothing can be downloaded",
              file=sys.stderr)
        return 1
    try:
        plan = plan_pull(name, revision=args.revision, cache_dir=cache_dir(), allow_patterns=ALLOW_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - a missing repo or a network error is one line for the user
        print(f"qwenstack pull: cannot list '{name}': {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    missing = plan.missing_bytes
    print(f"pulling {name}: {len(plan.files)} files, {human_size(plan.total_bytes)}"
          + (f" ({human_size(missing)} to download)" if missing != plan.total_bytes else ""))
    print(f"into {plan.destination or cache_dir()}", flush=True)
    if not any(f.will_download for f in plan.files):
        print("already up to date")
        return 0
    try:
        path = pull(plan)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        print(f"qwenstack pull: download failed: {type(exc).__name__}: {exc} (run again to resume)", file=sys.stderr)
        return 1
    print(f"done: {path}\nrun it with `qwenstack chat {name}` or `qwenstack serve {name}`")
    return 0


COMMANDS = [Command("pull", "Download a model from Hugging Face into the local cache (resumable)",
                    add_arguments, run, order=35)]
