"""The bundled demo model (qwenstack/assets/demo-model, trained by scripts/train_demo_model.py): it loads
with transformers and with qwenstack and both decode the same greedy tokens; the held-out perplexity in
its model card is what qwenstack measures; config and tokenizer carry Qwen3's special tokens."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import qwenstack
from qwenstack.evaluation.perplexity import heldout_perplexity
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer
from tokenizer_training import ADDED_TOKENS, SPECIAL_TOKENS

DEMO = Path(qwenstack.__file__).parent / "assets" / "demo-model"
CHAT_PROMPTS = [
    "Good morrow, friend. What news from the court?",
    "Wilt thou be gone? It is not yet near day.",
    "What is the capital of France?",
]
MAX_NEW_TOKENS = 24


def read_json(name: str) -> dict:
    return json.loads((DEMO / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DEMO)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # float32 compute from the stored bfloat16 weights: the dtype the model card's perplexity uses.
    return load_model(DEMO, dtype=torch.float32)


def chat_prompt(tokenizer: Tokenizer, message: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         enable_thinking=False)
    return tokenizer.encode(text)


def test_checkpoint_files_and_size() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "heldout.txt"):
        assert (DEMO / name).is_file(), f"the demo model lacks {name}"
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total <= 25 * 2**20, f"the demo model folder is {total / 2**20:.1f} MiB; the limit is 25 MiB"


def test_config_and_tokenizer_have_qwen3_special_tokens(tokenizer: Tokenizer) -> None:
    config = read_json("config.json")
    assert config["model_type"] == "qwen3"
    im_end = tokenizer.token_to_id("<|im_end|>")
    for token in SPECIAL_TOKENS + ADDED_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None, f"{token} is not in the vocabulary"
        assert tokenizer.encode(token) == [token_id], f"{token} does not encode as one token"
    # Chat generation must stop at <|im_end|>, in both configs and in the tokenizer's view.
    assert config["eos_token_id"] == im_end
    generation = read_json("generation_config.json")
    assert im_end in generation["eos_token_id"]
    assert generation["temperature"] == 0.8 and generation["top_p"] == 0.95
    assert im_end in tokenizer.eos_token_ids
    assert tokenizer.vocab_size == config["vocab_size"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hail!"}], enable_thinking=False)
    assert prompt == "<|im_start|>user\nHail!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_greedy_tokens_match_transformers(model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    eos = tuple(tokenizer.eos_token_ids)
    prompts = [chat_prompt(tokenizer, m) for m in CHAT_PROMPTS]
    ours = greedy_generate(model, prompts, MAX_NEW_TOKENS, eos_token_ids=eos)
    for message, prompt, got in zip(CHAT_PROMPTS, prompts, ours):
        hf_prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=False)
        assert hf_tokenizer.encode(hf_prompt, add_special_tokens=False) == prompt
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    temperature=None, top_p=None, eos_token_id=list(eos),
                                    pad_token_id=tokenizer.token_to_id("<|endoftext|>"))
        expected = out[0, len(prompt):].tolist()
        assert got == expected, (
            f"{message!r}: qwenstack {tokenizer.decode(got)!r} vs transformers {tokenizer.decode(expected)!r}"
        )
        assert len(got) > 1 and got[0] not in eos, f"{message!r}: the demo model gave an empty reply"


@pytest.mark.slow  # the model card figure, recomputed over the whole held-out split
def test_heldout_perplexity_matches_model_card(model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    card = (DEMO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"Held-out perplexity: ([0-9.]+)", card)
    assert match, "the model card states no held-out perplexity"
    stated = float(match.group(1))
    context_len = read_json("config.json")["max_position_embeddings"]
    text = (DEMO / "heldout.txt").read_text(encoding="utf-8")
    measured = heldout_perplexity(model, tokenizer, text, context_len)
    assert abs(measured / stated - 1) < 0.01, f"measured {measured:.3f}, the model card says {stated:.3f}"


def test_perplexity_windows_score_every_token_once(tiny_qwen3: Path) -> None:
    from qwenstack.evaluation.perplexity import token_perplexity, window_starts
    from qwenstack.models.base import prompt_logits

    tiny = load_model(tiny_qwen3, dtype=torch.float32)
    ids = torch.randint(0, tiny.args.vocab_size, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    logprobs = torch.log_softmax(prompt_logits(tiny, torch.tensor([ids]))[0, :-1], -1)
    reference = -logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
    whole = token_perplexity(tiny, ids, context_len=64)
    assert whole.num_tokens == 49 and whole.mean_nll == pytest.approx(reference, rel=1e-5)
    # Windows of 8 sharing one token: starts 0, 7, 14, ...; the last one is shorter. Still 49 predictions.
    assert window_starts(50, 8) == [0, 7, 14, 21, 28, 35, 42]
    windowed = token_perplexity(tiny, ids, context_len=8, batch_size=3)
    assert windowed.num_tokens == 49
    assert windowed.mean_nll != pytest.approx(reference, rel=1e-6)  # shorter contexts: a different figure
    assert window_starts(8, 8) == [0] and window_starts(9, 8) == [0, 7]
