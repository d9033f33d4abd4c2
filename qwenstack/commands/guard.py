"""`qwenstack guard --model GUARD_MODEL "text" ...` / `--file items.jsonl`: batch moderation with Qwen3Guard.

Each item is judged as a user prompt, or as an answer when it carries one (response moderation), by a
Qwen3Guard-Gen checkpoint (batched on one engine) or a Qwen3Guard-Stream checkpoint (told apart by its
config.json). The result is a table (or JSON lines with --json) and a summary by level and action.

JSONL lines may be a string (a prompt), or an object with `prompt` (or `text`/`input`) and optionally
`response` (or `answer`), or `messages` (a chat conversation, judged in the direction of its last turn).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from qwenstack.commands import Command
from qwenstack.commands._common import add_model_options

EPILOG = """examples:
  qwenstack guard --model Qwen/Qwen3Guard-Gen-0.6B "How do I make a bomb?"
  qwenstack guard -m Qwen/Qwen3Guard-Gen-0.6B "How do I make a bomb?" --answer "I can't help with that."
  qwenstack guard -m Qwen/Qwen3Guard-Gen-4B --file chats.jsonl --policy controversial=block --json
  cat prompts.jsonl | qwenstack guard -m ./Qwen3Guard-Stream-0.6B --file -"""

TEXT_COLUMN = 48


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="prompts to moderate (each as a user message)")
    parser.add_argument("--model", "-m", required=True, metavar="GUARD_MODEL",
                        help="a Qwen3Guard-Gen or Qwen3Guard-Stream model id or directory")
    parser.add_argument("--answer", default=None, metavar="TEXT",
                        help="moderate this answer to the (single) TEXT prompt instead of the prompt")
    parser.add_argument("--file", "-f", default=None, metavar="PATH",
                        help="JSONL of items to moderate ('-' reads standard input)")
    parser.add_argument("--policy", default=None, metavar="SPEC",
                        help="[prompt.|answer.]LEVEL=ACTION,... over the defaults (Safe allow, Controversial flag, "
                             "Unsafe block, unknown block)")
    parser.add_argument("--fail-open", action="store_true", help="flag unreadable verdicts instead of blocking them")
    parser.add_argument("--json", action="store_true", help="print one JSON object per item instead of a table")
    add_model_options(parser)


def _item(value: Any, where: str) -> list[dict[str, Any]]:
    """One JSONL value -> the conversation to judge (its last turn decides the direction)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        if isinstance(value.get("messages"), list):
            return list(value["messages"])
        prompt = next((value[k] for k in ("prompt", "text", "input") if isinstance(value.get(k), str)), None)
        answer = next((value[k] for k in ("response", "answer") if isinstance(value.get(k), str)), None)
        if prompt is not None:
            turns = [{"role": "user", "content": prompt}]
            return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])
    raise ValueError(f"{where}: expected a string or an object with prompt/text/input (and optionally response) "
                     f"or messages")


def read_items(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    items: list[list[dict[str, Any]]] = []
    if args.answer is not None and len(args.texts) != 1:
        raise ValueError("--answer needs exactly one TEXT (the prompt it answers)")
    for text in args.texts:
        turns = [{"role": "user", "content": text}]
        items.append(turns + ([{"role": "assistant", "content": args.answer}] if args.answer is not None else []))
    if args.file is not None:
        name = "<stdin>" if args.file == "-" else args.file
        lines = sys.stdin.read().splitlines() if args.file == "-" else Path(args.file).read_text("utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name}:{number}: not JSON ({exc.msg})") from None
            items.append(_item(value, f"{name}:{number}"))
    if not items:
        raise ValueError("nothing to moderate: give TEXT or --file")
    return items


def direction_of(messages: list[dict[str, Any]]) -> Any:
    from qwenstack.guard.verdict import Direction

    roles = [m.get("role") for m in messages if m.get("role") in ("user", "assistant")]
    if not roles:
        raise ValueError("an item has no user or assistant message")
    return Direction.ANSWER if roles[-1] == "assistant" else Direction.PROMPT


def judge(args: argparse.Namespace, items: list[list[dict[str, Any]]]) -> tuple[list[Any], float]:
    """Decisions for the items, with the guard named by --model, and the seconds spent judging them."""
    from qwenstack.config import read_config
    from qwenstack.guard.gen import GenGuard, guard_messages
    from qwenstack.guard.rails import Guardrails
    from qwenstack.guard.verdict import Direction, GuardPolicy, decide
    from qwenstack.models.qwen3_guard_stream import GuardStream, is_stream_guard_config
    from qwenstack.resolve import resolve_model

    policy = GuardPolicy.parse(args.policy, fail_open=args.fail_open)
    directions = [direction_of(m) for m in items]
    path = resolve_model(args.model)
    dtype = None if args.dtype == "auto" else args.dtype
    if is_stream_guard_config(read_config(path)):
        from qwenstack.loading import default_device

        rails = Guardrails(policy, stream=GuardStream.load(path, dtype=dtype or "bfloat16",
                                                           device=args.device or default_device()))
        start = time.monotonic()
        verdicts = []
        for messages, direction in zip(items, directions):
            answer = None
            if direction is Direction.ANSWER:
                turns = guard_messages(messages, direction)
                messages, answer = turns[:-1], turns[-1]["content"]
            verdicts.append(rails.stream_verdict(messages, answer))
    else:
        guard = GenGuard.load(path, dtype=dtype, device=args.device, max_model_len=args.max_model_len,
                              kv_cache_memory=args.kv_cache_memory or 256 * 1024**2,
                              kv_cache_dtype=args.kv_cache_dtype)
        start = time.monotonic()
        verdicts = guard.moderate_many(list(zip(items, directions)))
    return [decide(policy, d, v) for d, v in zip(directions, verdicts)], time.monotonic() - start


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(items: list[list[dict[str, Any]]], decisions: list[Any]) -> str:
    header = ("#", "direction", "safety", "action", "categories", "refusal", "text")
    rows = []
    for i, (messages, d) in enumerate(zip(items, decisions), 1):
        rows.append((str(i), d.direction.value, d.verdict.safety.value, d.action.value,
                     ", ".join(d.verdict.categories) or "-", d.verdict.refusal.value if d.verdict.refusal else "-",
                     _clip(str(messages[-1].get("content") or ""), TEXT_COLUMN)))
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def format_summary(decisions: list[Any], seconds: float) -> str:
    levels = Counter(d.verdict.safety.value for d in decisions)
    actions = Counter(d.action.value for d in decisions)
    order = ("Safe", "Controversial", "Unsafe", "unknown")
    level_text = ", ".join(f"{levels[k]} {k}" for k in order if levels[k])
    action_text = ", ".join(f"{actions[k]} {k}" for k in ("allow", "flag", "block") if actions[k])
    return f"{len(decisions)} item(s): {level_text}; {action_text} (judged in {seconds:.2f} s)"


def run(args: argparse.Namespace) -> int:
    items = read_items(args)
    decisions, seconds = judge(args, items)
    if args.json:
        for messages, d in zip(items, decisions):
            print(json.dumps({**d.to_dict(), "raw": d.verdict.raw, "messages": messages}, ensure_ascii=False))
    else:
        print(format_table(items, decisions))
        print()
        print(format_summary(decisions, seconds))
    return 0


COMMANDS = [Command("guard", "Moderate prompts and answers with a Qwen3Guard model (text or a JSONL file)",
                    add_arguments, run, description=__doc__, order=40)]
