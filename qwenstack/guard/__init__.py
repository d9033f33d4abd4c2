"""Qwen3Guard in the loop: verdicts and policy (verdict.py), the generative guard run on an engine
(gen.py), the token-level Stream guard (qwenstack.models.qwen3_guard_stream) and the guardrails that use
both on prompts, answers and streams (rails.py; the HTTP side is qwenstack.serving.moderation).

Importing this package is cheap (no torch): the CLI and the server import the heavy parts when used."""
from qwenstack.guard.verdict import (
    CATEGORIES, Action, Decision, Direction, GuardPolicy, LevelActions, Refusal, Safety, Verdict, decide,
    parse_verdict,
)

__all__ = ["CATEGORIES", "Action", "Decision", "Direction", "GuardPolicy", "LevelActions", "Refusal", "Safety",
           "Verdict", "decide", "parse_verdict"]
