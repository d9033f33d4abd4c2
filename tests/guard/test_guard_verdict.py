"""The Qwen3Guard-Gen output parser and the guard policy: documented formats, odd spacing and case, several
categories, missing lines and garbage (an explicit unknown verdict, never an exception)."""
from __future__ import annotations

import pytest

from qwenstack.guard.verdict import (
    CATEGORIES, Action, Direction, GuardPolicy, Refusal, Safety, Verdict, decide, parse_verdict,
)


@pytest.mark.parametrize("text, safety, categories, refusal", [
    # The README's two documented outputs.
    ("Safety: Unsafe\nCategories: Violent", Safety.UNSAFE, ("Violent",), None),
    ("Safety: Safe\nCategories: None\nRefusal: Yes", Safety.SAFE, (), Refusal.YES),
    ("Safety: Controversial\nCategories: Politically Sensitive Topics\nRefusal: No",
     Safety.CONTROVERSIAL, ("Politically Sensitive Topics",), Refusal.NO),
    # Several categories, in any case, with odd separators and spacing.
    ("Safety: Unsafe\nCategories: Violent, Non-violent Illegal Acts,PII", Safety.UNSAFE,
     ("Violent", "Non-violent Illegal Acts", "PII"), None),
    ("safety:unsafe\ncategories :  sexual content or sexual acts ;  suicide & self-harm \n", Safety.UNSAFE,
     ("Sexual Content or Sexual Acts", "Suicide & Self-Harm"), None),
    ("  SAFETY :   CONTROVERSIAL  \r\n Categories:Unethical Acts, Unethical Acts", Safety.CONTROVERSIAL,
     ("Unethical Acts",), None),
    ("**Safety**: Unsafe\n**Categories**: Jailbreak\n**Refusal**: no", Safety.UNSAFE, ("Jailbreak",), Refusal.NO),
    ("Safety ： Unsafe\nCategories： Copyright Violation", Safety.UNSAFE, ("Copyright Violation",), None),
    ("Safety: Unsafe\nCategories: Personally Identifiable Information", Safety.UNSAFE, ("PII",), None),
    # A think block first (a reasoning-style guard), its text ignored.
    ("<think>\nSafety: Safe?\n</think>\n\nSafety: Unsafe\nCategories: Violent", Safety.UNSAFE, ("Violent",), None),
    # An unknown category is kept as written.
    ("Safety: Unsafe\nCategories: Violent, Cyber Attacks", Safety.UNSAFE, ("Violent", "Cyber Attacks"), None),
    # Missing lines.
    ("Safety: Unsafe", Safety.UNSAFE, (), None),
    ("Safety: Unsafe\nViolent content", Safety.UNSAFE, ("Violent",), None),  # no Categories line: names found
    ("Categories: Violent\nRefusal: No", Safety.UNKNOWN, ("Violent",), Refusal.NO),  # no Safety line
    ("Refusal: Yes", Safety.UNKNOWN, (), Refusal.YES),
    # A Safe verdict names no harm even when a category slips in.
    ("Safety: Safe\nCategories: Violent", Safety.SAFE, (), None),
])
def test_parses_documented_and_drifting_formats(text: str, safety: Safety, categories: tuple[str, ...],
                                                refusal: Refusal | None) -> None:
    verdict = parse_verdict(text)
    assert (verdict.safety, verdict.categories, verdict.refusal) == (safety, categories, refusal)
    assert verdict.raw == text


@pytest.mark.parametrize("text", ["", "   \n", "I cannot help with that.", "Safety: maybe", "Safety:",
                                  "Refusal: perhaps", "\x00\xff garbage 🚀", "Safety Unsafe", "{\"safety\": 1}"])
def test_garbage_is_an_explicit_unknown(text: str) -> None:
    verdict = parse_verdict(text)
    assert verdict.safety is Safety.UNKNOWN and verdict.is_unknown
    assert verdict.refusal is None


def test_non_text_never_raises() -> None:
    assert parse_verdict(None).safety is Safety.UNKNOWN  # type: ignore[arg-type]
    assert parse_verdict(b"Safety: Safe").safety is Safety.UNKNOWN  # type: ignore[arg-type]


def test_published_categories_round_trip() -> None:
    text = "Safety: Unsafe\nCategories: " + ", ".join(CATEGORIES)
    assert parse_verdict(text).categories == CATEGORIES


def test_default_policy_fails_closed() -> None:
    policy = GuardPolicy.parse(None)
    for direction in Direction:
        assert policy.action(direction, Verdict(Safety.SAFE)) is Action.ALLOW
        assert policy.action(direction, Verdict(Safety.CONTROVERSIAL)) is Action.FLAG
        assert policy.action(direction, Verdict(Safety.UNSAFE)) is Action.BLOCK
        assert policy.action(direction, Verdict.unknown("garbage")) is Action.BLOCK
    assert not policy.fail_open


def test_fail_open_flags_unknown_and_spec_overrides() -> None:
    policy = GuardPolicy.parse("controversial=block, prompt.unsafe=flag,answer.unknown=allow", fail_open=True)
    assert policy.fail_open
    assert policy.action(Direction.PROMPT, Verdict.unknown("x")) is Action.FLAG
    assert policy.action(Direction.ANSWER, Verdict.unknown("x")) is Action.ALLOW
    assert policy.action(Direction.PROMPT, Verdict(Safety.UNSAFE)) is Action.FLAG
    assert policy.action(Direction.ANSWER, Verdict(Safety.UNSAFE)) is Action.BLOCK
    assert policy.action(Direction.ANSWER, Verdict(Safety.CONTROVERSIAL)) is Action.BLOCK
    assert "prompt: safe=allow, controversial=block, unsafe=flag, unknown=flag" in policy.describe()


@pytest.mark.parametrize("spec", ["unsafe", "unsafe=deny", "severe=block", "reply.unsafe=block", "=block"])
def test_bad_policy_names_the_item(spec: str) -> None:
    with pytest.raises(ValueError, match="guard policy item"):
        GuardPolicy.parse(spec)


def test_decision_annotation() -> None:
    decision = decide(GuardPolicy(), Direction.ANSWER, parse_verdict("Safety: Unsafe\nCategories: PII\nRefusal: No"))
    assert decision.blocked and decision.flagged
    assert decision.to_dict() == {"direction": "answer", "safety": "Unsafe", "categories": ["PII"],
                                  "refusal": "No", "action": "block"}
