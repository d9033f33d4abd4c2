"""Qwen3Guard verdicts, the tolerant parser of Qwen3Guard-Gen output, and the policy that turns a verdict
into an action.

Qwen3Guard-Gen answers in lines (the QwenLM/Qwen3Guard README):

    Safety: Unsafe                  Safety: Safe
    Categories: Violent             Categories: None
                                    Refusal: Yes          (response moderation only)

Decisions:
- Parsing never raises. Text without a recognisable `Safety:` line is an explicit `Safety.UNKNOWN`
  verdict (the raw text kept), and the policy decides what unknown means: block by default (fail
  closed), flag when the operator chooses fail open.
- Tolerant where models drift: case, spacing, a full-width colon, Markdown bold, a think block before the
  answer, several categories separated by commas (or semicolons), categories in any case. Known category
  names are returned in their published spelling; an unknown name is kept as written rather than dropped.
- A policy is a table: direction (prompt, answer) x level (Safe, Controversial, Unsafe, unknown) -> action
  (allow, flag, block). Written on the command line as `[DIRECTION.]LEVEL=ACTION,...`, for example
  `controversial=block` or `prompt.unsafe=flag,answer.unsafe=block`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from qwenstack.markup import THINK_END


class Safety(str, Enum):
    SAFE = "Safe"
    UNSAFE = "Unsafe"
    CONTROVERSIAL = "Controversial"
    UNKNOWN = "unknown"  # the guard's output could not be read (or the guard could not run)

    @classmethod
    def from_label(cls, label: str) -> "Safety":
        """'Safe', 'unsafe', 'CONTROVERSIAL' -> the level; anything else -> UNKNOWN."""
        return _LEVELS.get(label.strip().lower(), cls.UNKNOWN)


_LEVELS = {"safe": Safety.SAFE, "unsafe": Safety.UNSAFE, "controversial": Safety.CONTROVERSIAL}


class Refusal(str, Enum):
    YES = "Yes"
    NO = "No"


class Direction(str, Enum):
    PROMPT = "prompt"  # what a user sent (Qwen3Guard's prompt moderation, the Stream model's query heads)
    ANSWER = "answer"  # what the assistant replied (response moderation)


class Action(str, Enum):
    ALLOW = "allow"
    FLAG = "flag"  # let it through, annotated with the verdict
    BLOCK = "block"


# The published categories, in the README's order and spelling. Jailbreak applies to prompts only.
CATEGORIES: tuple[str, ...] = (
    "Violent", "Non-violent Illegal Acts", "Sexual Content or Sexual Acts", "PII", "Suicide & Self-Harm",
    "Unethical Acts", "Politically Sensitive Topics", "Copyright Violation", "Jailbreak",
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9&]+", "", name.lower())


_CATEGORY_KEYS: dict[str, str] = {_key(c): c for c in CATEGORIES}
_CATEGORY_KEYS.update({
    _key("Personally Identifiable Information"): "PII",
    _key("PII (Personally Identifiable Information)"): "PII",
    _key("Suicide and Self-Harm"): "Suicide & Self-Harm",
    _key("Non violent Illegal Acts"): "Non-violent Illegal Acts",
})
_NONE_KEYS = {"none", "na", "nocategory", "null", ""}


@dataclass(frozen=True)
class Verdict:
    safety: Safety
    categories: tuple[str, ...] = ()
    refusal: Refusal | None = None  # response moderation: did the assistant refuse?
    raw: str = ""  # the guard's text (Gen), or a note on where the verdict came from
    score: float | None = None  # probability of `safety` when the guard gives one (Stream), else None

    @property
    def is_unknown(self) -> bool:
        return self.safety is Safety.UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        return {"safety": self.safety.value, "categories": list(self.categories),
                "refusal": None if self.refusal is None else self.refusal.value}

    @classmethod
    def unknown(cls, reason: str) -> "Verdict":
        return cls(Safety.UNKNOWN, raw=reason)


# `Safety: Unsafe`, `**Safety**: unsafe`, `safety ：UNSAFE`, `- Safety = Safe` ...
_FIELD = r"^[ \t>*#_-]*{name}[ \t*_]*[:：=][ \t*_]*(?P<value>[^\n]*)$"
_SAFETY = re.compile(_FIELD.format(name="safety"), re.IGNORECASE | re.MULTILINE)
_CATEGORIES = re.compile(_FIELD.format(name="categor(?:y|ies)"), re.IGNORECASE | re.MULTILINE)
_REFUSAL = re.compile(_FIELD.format(name="refusal"), re.IGNORECASE | re.MULTILINE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SPLIT = re.compile(r"[,;，、|]")
_FALLBACK_CATEGORY = re.compile("|".join(re.escape(c) for c in sorted(CATEGORIES, key=len, reverse=True)))


def _first_word(value: str) -> str:
    match = re.match(r"[\s*_`\"']*([A-Za-z]+)", value)
    return match.group(1) if match else ""


def parse_categories(value: str) -> tuple[str, ...]:
    """`Violent, PII` -> ('Violent', 'PII'); `None` -> (); unknown names kept as written."""
    found: list[str] = []
    for item in _SPLIT.split(value):
        item = item.strip().strip("*_`\"'.").strip()
        key = _key(item)
        if key in _NONE_KEYS:
            continue
        name = _CATEGORY_KEYS.get(key, item)
        if name not in found:
            found.append(name)
    return tuple(found)


def parse_verdict(text: str) -> Verdict:
    """A Qwen3Guard-Gen answer -> Verdict. Never raises; unreadable text gives Safety.UNKNOWN."""
    if not isinstance(text, str):
        return Verdict.unknown(repr(text))
    body = _THINK.sub("", text)
    if THINK_END in body:  # a think block whose start was in the prompt
        body = body.split(THINK_END, 1)[1]
    safety = Safety.UNKNOWN
    if (m := _SAFETY.search(body)) is not None:
        safety = Safety.from_label(_first_word(m.group("value")))
    if (m := _CATEGORIES.search(body)) is not None:
        categories = parse_categories(m.group("value"))
    else:  # no Categories line: the published names wherever they appear (what the README's regex does)
        categories = tuple(dict.fromkeys(_FALLBACK_CATEGORY.findall(body)))
    refusal = None
    if (m := _REFUSAL.search(body)) is not None:
        word = _first_word(m.group("value")).lower()
        refusal = Refusal.YES if word == "yes" else Refusal.NO if word == "no" else None
    if safety is Safety.SAFE:
        categories = ()  # "Categories: None" or a stray name: a Safe verdict names no harm
    return Verdict(safety, categories, refusal, raw=text)


# --- policy ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelActions:
    """What to do with each level in one direction."""

    safe: Action = Action.ALLOW
    controversial: Action = Action.FLAG
    unsafe: Action = Action.BLOCK
    unknown: Action = Action.BLOCK  # fail closed

    def for_level(self, safety: Safety) -> Action:
        return {Safety.SAFE: self.safe, Safety.CONTROVERSIAL: self.controversial,
                Safety.UNSAFE: self.unsafe, Safety.UNKNOWN: self.unknown}[safety]


@dataclass(frozen=True)
class GuardPolicy:
    prompt: LevelActions = field(default_factory=LevelActions)
    answer: LevelActions = field(default_factory=LevelActions)

    def for_direction(self, direction: Direction) -> LevelActions:
        return self.prompt if direction is Direction.PROMPT else self.answer

    def action(self, direction: Direction, verdict: Verdict) -> Action:
        return self.for_direction(direction).for_level(verdict.safety)

    @property
    def fail_open(self) -> bool:
        return self.prompt.unknown is not Action.BLOCK and self.answer.unknown is not Action.BLOCK

    @classmethod
    def parse(cls, spec: str | None = None, *, fail_open: bool = False) -> "GuardPolicy":
        """`[prompt.|answer.]LEVEL=ACTION` items separated by commas, applied over the defaults
        (Safe allow, Controversial flag, Unsafe block, unknown block; fail_open: unknown flag).
        Raises ValueError naming the bad item."""
        unknown = Action.FLAG if fail_open else Action.BLOCK
        tables = {d: LevelActions(unknown=unknown) for d in Direction}
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            target, sep, value = item.partition("=")
            direction_name, dot, level_name = target.strip().lower().rpartition(".")
            try:
                action = Action(value.strip().lower())
            except ValueError:
                action = None
            levels = {"safe", "controversial", "unsafe", "unknown"}
            if not sep or action is None or level_name not in levels or (dot and direction_name not in
                                                                         ("prompt", "answer")):
                raise ValueError(
                    f"guard policy item {item!r} is not [prompt.|answer.]LEVEL=ACTION with LEVEL one of "
                    f"safe, controversial, unsafe, unknown and ACTION one of allow, flag, block")
            for d in ([Direction(direction_name)] if dot else list(Direction)):
                tables[d] = replace(tables[d], **{level_name: action})
        return cls(prompt=tables[Direction.PROMPT], answer=tables[Direction.ANSWER])

    def describe(self) -> str:
        parts = []
        for d in Direction:
            t = self.for_direction(d)
            parts.append(f"{d.value}: " + ", ".join(f"{lvl}={getattr(t, lvl).value}"
                                                     for lvl in ("safe", "controversial", "unsafe", "unknown")))
        return "; ".join(parts)


@dataclass(frozen=True)
class Decision:
    """A verdict with the action the policy chose for it: what responses carry as `qwenstack_guard`."""

    direction: Direction
    verdict: Verdict
    action: Action
    latency_s: float = 0.0

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    @property
    def flagged(self) -> bool:
        return self.action is not Action.ALLOW

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction.value, **self.verdict.to_dict(), "action": self.action.value}


def decide(policy: GuardPolicy, direction: Direction, verdict: Verdict, latency_s: float = 0.0) -> Decision:
    return Decision(direction, verdict, policy.action(direction, verdict), latency_s)
