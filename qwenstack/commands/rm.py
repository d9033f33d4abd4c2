"""`qwenstack rm MODEL`: delete a model from the local Hugging Face cache (as `ollama rm`), all its revisions,
and say how much space that freed. The bundled demo model is part of the package and cannot be removed."""
from __future__ import annotations

import argparse
import sys

from qwenstack.commands import Command
from qwenstack.commands._common import human_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="+", help="Hugging Face model id(s) as `qwenstack models` lists them")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import scan_cache_dir

    from qwenstack.commands.models import DEMO_NAME, cache_dir

    directory = cache_dir()
    repos = {}
    if directory.is_dir():
        repos = {r.repo_id: r for r in scan_cache_dir(directory).repos if r.repo_type == "model"}
    status = 0
    for name in args.model:
        if name == DEMO_NAME:
            print(f"qwenstack rm: {DEMO_NAME} is bundled with qwenstack and cannot be removed", file=sys.stderr)
            status = 1
            continue
        repo = repos.get(name)
        if repo is None:
            known = ", ".join(sorted(repos)) or "none"
            print(f"qwenstack rm: '{name}' is not in the cache at {directory} (cached: {known})", file=sys.stderr)
            status = 1
            continue
        strategy = scan_cache_dir(directory).delete_revisions(*(r.commit_hash for r in repo.revisions))
        strategy.execute()
        print(f"deleted {name} ({human_size(repo.size_on_disk)} freed)")
    return status


COMMANDS = [Command("rm", "Delete a pulled model from the local cache", add_arguments, run, order=41)]
