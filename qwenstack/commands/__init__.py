"""The subcommand registry of the `qwenstack` CLI.

Each module in this package (a name not starting with `_`) that defines `COMMANDS` adds subcommands;
`qwenstack.cli` finds them with `pkgutil`, so a new command is a new module, with no edit anywhere else:

    # qwenstack/commands/plan.py
    from qwenstack.commands import Command

    def add_arguments(parser): parser.add_argument("model", nargs="?")
    def run(args) -> int: ...
    COMMANDS = [Command("plan", "Estimate memory and throughput for a model", add_arguments, run)]

`group="bench"` puts a command under `qwenstack bench` (as `bench serve`); a group is created on first use.
Commands still to come fit the same pattern: `bench_report.py` (bench report), `plan.py`, `eval_quality.py`
(eval-quality), `guard.py`, `train_demo.py` (train-demo). Shared options (model, memory, sampling) are in
`qwenstack.commands._common`.

Command modules are imported for every `qwenstack` invocation (even `--help`), so they must stay cheap to
import: torch, the engine and the server are imported inside `run`, never at module level.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

# Help text of command groups; a group not listed here gets a generic one.
GROUP_HELP = {
    "bench": "Measure a running server or the engine (bench serve, ...)",
}


@dataclass(frozen=True)
class Command:
    name: str  # as typed on the command line, e.g. "eval-quality"
    help: str  # one line, shown in `qwenstack --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], "int | None"]  # returns the exit status (None means 0)
    group: str | None = None  # e.g. "bench" for `qwenstack bench serve`
    description: str | None = None  # longer text for `qwenstack NAME --help`; defaults to `help`
    order: int = 50  # position in the help listing (lower first), then by name
    aliases: tuple[str, ...] = ()  # other names it answers to (`run`, what Ollama calls chat)
    # The nargs="*" positional that also takes positionals given after options (`generate MODEL --max-tokens 3
    # PROMPT`: argparse fills such a positional once, from the words before the first option).
    rest: str | None = None
