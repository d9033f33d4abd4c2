"""The translator's commit policy on its own, with a fake LLM: units are cut only where any longer text
would cut them too (so a stream's units are its final transcript's units), published translation is
append-only and equals the offline translation, and a target change applies to later units only."""
from __future__ import annotations

import asyncio
import random

import pytest

from qwenstack.engine.params import SamplingParams
from qwenstack.translate.translator import IncrementalTranslation, Translator, target_code, translate_text
from qwenstack.translate.units import UnitPolicy, cut_units, split_units

POLICY = UnitPolicy(clauses=True, wait_k=4)


@pytest.mark.parametrize("text, final, units, rest", [
    ("Hello there. How are", False, ["Hello there."], "How are"),
    ("Hello there. How are", True, ["Hello there.", "How are"], ""),
    ("Yes, I know! ", False, ["Yes,", "I know!"], ""),
    ("one two three four five six", False, ["one two three four"], "five six"),  # wait-k: 4 words at most
    ("It costs 3.", False, [], "It costs 3."),  # "3." may still become "3.5": not yet a boundary
    ('He said "stop." Then', False, ['He said "stop."'], "Then"),  # a closing quote after the full stop
    ("你好。我很好，谢谢", False, ["你好。", "我很好，"], "谢谢"),  # CJK marks end their piece by themselves
])
def test_cut_units(text: str, final: bool, units: list[str], rest: str) -> None:
    got, used = cut_units(text, POLICY, final)
    assert got == units and text[used:].strip() == rest


def test_clauses_off_waits_for_the_sentence() -> None:
    assert cut_units("Yes, I know. ", UnitPolicy(clauses=False, wait_k=8))[0] == ["Yes, I know."]


def _random_text(rng: random.Random) -> str:
    words = ["alpha", "beta", "3.5", "x.", "gamma,", "delta.", "eps!", "zeta?", "eta;", "你好。", "谢谢，", '"quote."']
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))


def test_units_are_prefix_stable() -> None:
    """Whatever prefix of a text a stream has committed, its complete units are the first units of the
    finished text: nothing cut early is ever cut differently later."""
    rng = random.Random(0)
    for _ in range(300):
        text = _random_text(rng)
        final = split_units(text, POLICY)
        for end in range(len(text) + 1):
            units, used = cut_units(text[:end], POLICY)
            assert units == final[:len(units)], (text, end)
            assert (units + split_units(text[used:], POLICY)) == final


class FakeTokenizer:
    """Characters as token ids; the chat template writes each message on its own line."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            enable_thinking: bool = True) -> str:
        assert not enable_thinking  # a translator never thinks
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def fake_llm(calls: list[str]):
    """Translates by upper-casing the last user message, tagged with the system prompt's language."""
    async def generate(prompt_ids: list[int], params: SamplingParams) -> list[int]:
        assert params.temperature == 0
        prompt = "".join(chr(i) for i in prompt_ids)
        lines = prompt.split("\n")
        language = lines[0].split(" into ")[1].split(".")[0]
        source = [line for line in lines if line.startswith("<user>")][-1][len("<user>"):]
        calls.append(source)
        return [ord(c) for c in f"[{language[:2]}] {source.upper()}\nextra rambling the answer must not carry"]
    return generate


def test_incremental_translation_is_append_only_and_equals_offline() -> None:
    translator = Translator(FakeTokenizer())
    text = "Good morning, everyone. The weather is fine today and the sun is warm. Thank you"
    rng = random.Random(1)

    async def live() -> tuple[IncrementalTranslation, list[str], list[str]]:
        calls: list[str] = []
        state = IncrementalTranslation(POLICY, "de")
        generate = fake_llm(calls)
        published, pos = [], 0
        while pos < len(text):  # committed source arrives in random pieces, as ASR commits do
            step = rng.randint(1, 9)
            state.add_source(text[pos:pos + step])
            pos += step
            for unit in state.ready():
                state.commit(unit, await translator.translate(generate, unit, "de", state.units), "de")
                published.append(state.published)
        for unit in state.ready(final=True):
            state.commit(unit, await translator.translate(generate, unit, "de", state.units), "de")
            published.append(state.published)
        return state, published, calls

    state, published, calls = asyncio.run(live())
    for before, after in zip(published, published[1:]):
        assert after.startswith(before)  # published translation only ever grows
    offline = asyncio.run(translate_text(translator, fake_llm([]), text, "de", POLICY))
    assert [u.text for u in state.units] == [u.text for u in offline]
    assert state.published == " ".join(u.text for u in offline)
    assert calls == split_units(text, POLICY)  # each unit translated exactly once, nothing re-translated
    assert state.published.startswith("[Ge] GOOD MORNING, [Ge] EVERYONE.") and "rambling" not in state.published


def test_target_change_applies_to_later_units() -> None:
    translator = Translator(FakeTokenizer())

    async def run() -> IncrementalTranslation:
        state = IncrementalTranslation(POLICY, "de")
        generate = fake_llm([])
        state.add_source("One. Two. ")
        for i, unit in enumerate(state.ready()):
            language = "de" if i == 0 else "fr"  # the client switched after the first unit
            state.commit(unit, await translator.translate(generate, unit, language, state.units), language)
        return state

    state = asyncio.run(run())
    assert state.published == "[Ge] ONE. [Fr] TWO."
    assert [u.language for u in state.units] == ["de", "fr"]


def test_history_is_bounded_and_the_prompt_carries_it() -> None:
    translator = Translator(FakeTokenizer())
    state = IncrementalTranslation(POLICY, "en")
    for i in range(5):
        state.commit(f"s{i}", f"t{i}", "en")
    messages = translator.messages("now", "en", state.units)
    assert [m["content"] for m in messages[1:]] == ["s2", "t2", "s3", "t3", "s4", "t4", "now"]


def test_target_codes() -> None:
    assert target_code("DE") == "de" and target_code("German") == "de"
    with pytest.raises(ValueError, match="not supported"):
        target_code("klingon")


def test_serve_translate_flag() -> None:
    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import server_config, serve_config_from_args

    parser = build_parser(discover_commands()[0])
    args = parser.parse_args(["serve", "--translate", "asr=/m/asr,llm=/m/llm,tts=/m/tts,name=de-live,voice=eric"])
    config = server_config(serve_config_from_args(args))
    spec = config.translations[0]
    assert (spec.asr, spec.llm, spec.tts, spec.name, spec.voice) == ("/m/asr", "/m/llm", "/m/tts", "de-live", "eric")
    for bad in ("asr=/a,llm=/b", "asr=/a,llm=/b,tts=/c,colour=red", "asr=/a,asr=/b,llm=/b,tts=/c"):
        with pytest.raises(ValueError, match="--translate"):
            serve_config_from_args(parser.parse_args(["serve", "--translate", bad]))
