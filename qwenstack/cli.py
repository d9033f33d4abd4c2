"""`qwenstack`: the command line, in the spirit of Ollama (serve, chat, generate, models, bench).

The subcommands live in `qwenstack/commands/`, one module each, and are found through the registry
described in `qwenstack.commands`; this file only builds the argparse tree and runs the chosen command.
Errors a user can act on (`QwenstackError`, bad arguments) end as one line on stderr and exit status 1,
not a traceback (`--debug` shows it).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from qwenstack.commands import GROUP_HELP, Command


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwenstack")
    except PackageNotFoundError:
        return "unknown (not installed)"


def discover_commands() -> tuple[list[Command], list[str]]:
    """Every Command in qwenstack.commands.*, and a message for each module that failed to import.

    A broken module costs only its own commands: the rest of the CLI keeps working.
    """
    import qwenstack.commands as package

    commands: list[Command] = []
    errors: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - reported, and the other commands still load
            errors.append(f"qwenstack.commands.{info.name} failed to import: {type(exc).__name__}: {exc}")
            continue
        commands.extend(getattr(module, "COMMANDS", []))
    return sorted(commands, key=lambda c: (c.order, c.name)), errors


def _add_command(subparsers: argparse._SubParsersAction, command: Command) -> None:
    parser = subparsers.add_parser(
        command.name, help=command.help, description=command.description or command.help,
        formatter_class=argparse.RawDescriptionHelpFormatter, aliases=list(command.aliases),
    )
    command.add_arguments(parser)
    parser.set_defaults(_command=command, _command_parser=parser)


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenstack",
        description="A self-hosted runtime for Qwen3 models. With no MODEL, commands use the bundled demo model.",
    )
    parser.add_argument("--version", action="version", version=f"qwenstack {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in commands:
        if command.group is None:
            _add_command(subparsers, command)
            continue
        if command.group not in groups:
            help_text = GROUP_HELP.get(command.group, f"{command.group} commands")
            group_parser = subparsers.add_parser(command.group, help=help_text, description=help_text)
            group_parser.set_defaults(_group_parser=group_parser)
            groups[command.group] = group_parser.add_subparsers(title=f"{command.group} commands", metavar="COMMAND")
        _add_command(groups[command.group], command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from qwenstack.errors import QwenstackError

    commands, errors = discover_commands()
    parser = build_parser(commands)
    args, unknown = parser.parse_known_args(argv)
    rest = getattr(getattr(args, "_command", None), "rest", None)
    if unknown and rest and all(u == "-" or not u.startswith("-") for u in unknown):
        setattr(args, rest, list(getattr(args, rest)) + unknown)
        unknown = []
    if unknown:  # said by the subcommand's parser: its usage, not the top level's, under the mistake
        getattr(args, "_command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for error in errors:
        print(f"warning: {error}", file=sys.stderr)
    command: Command | None = getattr(args, "_command", None)
    if command is None:  # `qwenstack` or `qwenstack bench` alone
        getattr(args, "_group_parser", parser).print_help()
        return 0
    try:
        status = command.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (QwenstackError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
