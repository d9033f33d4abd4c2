"""Scripted checkpoints: real Qwen3 checkpoints (HF layout, loadable by qwenstack and transformers) whose
weights make greedy decoding emit a chosen text after any chat prompt, then <|im_end|>.

    ckpt = build_scripted_checkpoint(tmp / "think", CASES["think_answer"])
    LLM(ckpt.path).chat(msgs, SamplingParams(temperature=0))        -> ckpt.script
    ... with enable_thinking=False, or after a forced "\\n</think>\\n\\n"  -> ckpt.answer

How the weights work (one decoder layer, 1 attention head, MLP output zero):
- Tokens: the script's text between the real marker tokens (<think>, </think>, <tool_call>, </tool_call>) is cut
  into pieces, each piece text used once. A piece is a byte-level BPE vocabulary entry (an existing one, or a new
  entry that no merge produces, so encoding prompts never yields it): decoding is byte-exact, any Unicode.
- The residual stream after the layer is one-hot features: a constant, the current token, and the previous token
  (the attention head attends to position i-1 only: constant q and k whose RoPE phases peak at distance 1). The
  DESIGN.md recipe (attention zeroed: next token from the current one alone) cannot repeat a marker with two
  different successors, as two parallel tool calls need; looking one token back can.
- lm_head scores the next token additively: current token -> its successor where that is unique; otherwise
  (markers, the newline that ends every prompt) previous token -> successor, with the current token breaking
  ties. The table is checked by simulation when it is built; an ambiguous script raises ValueError.
- Entries: the last two tokens of a thinking-on prompt ("assistant\\n") lead to the script; those of a
  thinking-off prompt ("</think>\\n\\n") and of a forced close "\\n</think>\\n\\n" lead to the answer (what follows
  the think block). Anything unexpected leads to <|im_end|>. One checkpoint holds one script.
- `after_tool=TEXT` (an agent's second turn): a second head attends to any </tool_response> in the context
  (a content key on RoPE dimensions that barely turn, so distance does not matter), giving a "tool result seen"
  feature; the MLP ANDs it with the entry pair, and that AND picks TEXT instead of the script. Then a prompt
  ending in a tool result is answered with TEXT, any other with the script (e.g. tool calls).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from checkpoints import tiny_tokenizer
from qwenstack.tokenizer import Tokenizer
from tokenizer_training import ADDED_TOKENS, save_tokenizer

MARKERS = tuple(ADDED_TOKENS)  # <think>, </think>, <tool_call>, </tool_call>, <tool_response>, </tool_response>
THINK_END = "</think>"
FORCED_CLOSE = "\n</think>\n\n"  # what a thinking budget forces (qwenstack.engine.thinking_budget)

CASES: dict[str, str] = {
    "think_answer": "<think>\nThe user says hello. A short, friendly greeting fits.\n</think>\n\n"
    "Hello! How can I help you today?",
    "long_think": "<think>\n" + " ".join(f"Step {i}: weigh option {i}." for i in range(1, 13))
    + "\n</think>\n\nThe answer is 42.",
    "tool_call": "<think>\nI need the weather in Paris, so I call the tool.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "parallel_tool_calls": "<think>\nTwo cities, two calls.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>',
    "think_mentions_tool_call": "<think>\nI could answer directly, but writing <tool_call> with the weather tool is"
    " better.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
    "malformed_tool_call": "<think>\nCalling the tool.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',
    "unicode_answer": "<think>\nÜnïcödé test.\n</think>\n\nHéllo wörld, 你好，世界 🚀",
}

_CHUNK = re.compile(r"\s*\S+|\s+")
MARGIN = 40.0  # logits between the scripted token and the runner-up, at least
ROPE_THETA = 10.0  # fast-turning RoPE frequencies: a sharp peak at distance 1
ATTENTION_GAP = 40.0  # score of the previous position over any other, at least (softmax leak < e^-40)
TOOL_ROPE_THETA = 1e6  # with an after-tool script: slow pairs exist for the distance-blind tool head
TOOL_GAP = 60.0  # the tool head's score on </tool_response> over any other token


@dataclass(frozen=True)
class ScriptedCheckpoint:
    path: Path
    script: str  # greedy output after a thinking-on prompt (the template leaves the think block to the model)
    answer: str  # greedy output after a closed think block: thinking disabled, or after a forced close
    script_token_ids: list[int]  # the script's tokens, ending with <|im_end|>
    answer_token_ids: list[int]
    after_tool: str | None = None  # greedy output after a thinking-on prompt that contains a tool result
    after_tool_token_ids: list[int] | None = None


@lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(kept)
    n = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(kept, map(chr, chars)))


def _byte_level(text: str) -> str:
    table = _byte_encoder()
    return "".join(table[b] for b in text.encode("utf-8"))


def _segments(script: str) -> list[str]:
    """The script split into marker strings and the text between them (leading whitespace after </think>
    kept apart, so the answer can start after it)."""
    for special in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        if special in script:
            raise ValueError(f"a script cannot contain {special}: <|im_end|> is appended after it")
    parts = [p for p in re.split("(" + "|".join(map(re.escape, MARKERS)) + ")", script) if p]
    out: list[str] = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] == THINK_END and part not in MARKERS:
            stripped = part.lstrip()
            out += [x for x in (part[: len(part) - len(stripped)], stripped) if x]
        else:
            out.append(part)
    return out


def _pieces(text: str, used: set[str]) -> list[str]:
    """Cuts text into word-sized pieces, each different from the pieces in `used` where it can (a piece that is
    taken grows by the next chunk, or joins the previous piece); repeats left are checked by the caller."""
    chunks = _CHUNK.findall(text)
    pieces: list[str] = []
    i = 0
    while i < len(chunks):
        piece = chunks[i]
        i += 1
        while piece in used and i < len(chunks):
            piece += chunks[i]
            i += 1
        if piece in used and pieces and pieces[-1] + piece not in used:
            used.discard(pieces[-1])
            piece = pieces.pop() + piece
        used.add(piece)
        pieces.append(piece)
    return pieces


def _build_tokenizer(script: str, after_tool: str | None = None) -> tuple[object, list[int], list[int], list[int]]:
    """The tiny tokenizer plus the scripts' pieces as vocabulary entries; the script's, the answer's and the
    after-tool script's ids (empty without one)."""
    from tokenizers import Tokenizer as RustTokenizer

    base = tiny_tokenizer()
    data = json.loads(base.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    if "ĊĊ" not in vocab:
        # "\n\n" as one token, as in Qwen3's vocabulary: then a closed think block ("</think>\n\n") ends in a
        # token pair that a newline between two tool calls ("</tool_call>\n<tool_call>") does not repeat.
        vocab["ĊĊ"] = len(vocab)
        data["model"]["merges"].append(["Ċ", "Ċ"])
    used: set[str] = set()
    tokens, answer_start = _script_tokens(script, used)
    after_tokens = _script_tokens(after_tool, used)[0] if after_tool is not None else []
    # New entries extend the BPE vocabulary (no merge produces them, so prompts never encode to them); the
    # added tokens, which tokenizers numbers after the model vocabulary, move up behind them.
    for t in tokens + after_tokens:
        if t not in MARKERS and t not in vocab:
            vocab[t] = len(vocab)
    for i, added in enumerate(a for a in data["added_tokens"] if a["content"] not in vocab):
        added["id"] = len(vocab) + i
    tokenizer = RustTokenizer.from_str(json.dumps(data))
    ids = [tokenizer.token_to_id(t) for t in tokens]
    eos = tokenizer.token_to_id("<|im_end|>")
    script_ids, answer_ids = ids + [eos], ids[answer_start:] + [eos]
    after_ids = [tokenizer.token_to_id(t) for t in after_tokens] + [eos] if after_tool is not None else []
    checks = [(script_ids, script), (answer_ids, _answer(script))] + ([(after_ids, after_tool)] if after_tool else [])
    for got_ids, want in checks:
        got = tokenizer.decode(got_ids, skip_special_tokens=True)
        if got != want:
            raise ValueError(f"scripted tokens decode to {got!r}, not {want!r}")
    return tokenizer, script_ids, answer_ids, after_ids


def _script_tokens(script: str, used: set[str]) -> tuple[list[str], int]:
    """Marker contents and byte-level vocabulary strings for a script; where its answer starts (after </think>
    and the whitespace that follows it)."""
    segments = _segments(script)
    if "<think>" in segments and THINK_END not in segments:
        raise ValueError("the script opens a think block it never closes")
    tokens: list[str] = []
    answer_start = 0
    for k, seg in enumerate(segments):
        tokens += [seg] if seg in MARKERS else [_byte_level(p) for p in _pieces(seg, used)]
        if seg == THINK_END or (k > 0 and segments[k - 1] == THINK_END and not seg.strip()):
            answer_start = len(tokens)
    return tokens, answer_start


def _answer(script: str) -> str:
    """What follows the think block, leading whitespace dropped (the whole script when there is none)."""
    if THINK_END not in script:
        return script
    return script.split(THINK_END, 1)[1].lstrip()


def _entry_keys(tokenizer: Tokenizer) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(previous, current) token at the end of a thinking-on prompt; the same for closed think blocks."""
    messages = [{"role": "user", "content": "Hi"}]
    on = tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=True))
    off = tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=False))
    forced = tokenizer.encode("x" + FORCED_CLOSE)
    on_key = (on[-2], on[-1])
    closed: list[tuple[int, int]] = []
    for key in ((off[-2], off[-1]), (forced[-2], forced[-1])):
        if key != on_key and key not in closed:  # a template without a thinking-off form renders both alike
            closed.append(key)
    return on_key, closed


def _transitions(sequences: list[list[int]]) -> dict[tuple[int, int], int]:
    table: dict[tuple[int, int], int] = {}
    for seq in sequences:
        for i in range(1, len(seq) - 1):
            key, nxt = (seq[i - 1], seq[i]), seq[i + 1]
            if table.setdefault(key, nxt) != nxt:
                raise ValueError(f"the script needs token {seq[i]} after {seq[i - 1]} to lead to two different tokens")
    return table


def _rope_peak(head_dim: int, max_positions: int, theta: float = ROPE_THETA,
               pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q_norm and k_norm weights that make the (constant) query score highest on the previous position, using
    the first `pairs` RoPE pairs (all by default; the others are left zero)."""
    half = head_dim // 2
    pairs = half if pairs is None else pairs
    freqs = (theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))[:pairs]
    d = torch.arange(0, max_positions + 1, dtype=torch.float64)
    d = d[d != 1]
    gap = (1 - torch.cos(torch.outer(d - 1, freqs))).sum(1).min().item()  # in units of a^2 / sqrt(head_dim)
    a = math.sqrt(ATTENTION_GAP * math.sqrt(head_dim) / gap)
    q = torch.zeros(head_dim, dtype=torch.float64)
    k = torch.zeros(head_dim, dtype=torch.float64)
    q[:pairs] = a  # q pair f = a; k pair f = a e^{i theta_f}: q . R(i - j) k = a^2 cos(theta_f (i - j - 1))
    k[:pairs] = a * torch.cos(freqs)
    k[half:half + pairs] = a * torch.sin(freqs)
    return q.float(), k.float()


@dataclass
class _ToolHead:
    """The after-tool machinery: head 2 (RoPE pairs that barely turn) writes a "tool result seen" feature; an
    MLP unit ANDs it with the entry pair and writes an entry feature that picks the after-tool script."""
    theta: float = TOOL_ROPE_THETA
    head_dim: int = 128
    prev_pairs: int = 32  # head 1: the fast pairs
    seen_pairs: tuple[int, int] = (56, 64)  # head 2: the slow pairs (angle < 0.03 over 4096 positions)

    def dims(self) -> list[int]:
        half = self.head_dim // 2
        return [d for f in range(*self.seen_pairs) for d in (f, half + f)]

    def prev_dims(self) -> list[int]:
        half = self.head_dim // 2
        return [d for f in range(self.prev_pairs) for d in (f, half + f)]


def build_scripted_checkpoint(out_dir: str | Path, script: str, *, after_tool: str | None = None,
                              chat_template: str | None = None, max_position_embeddings: int = 4096,
                              dtype: torch.dtype = torch.float32) -> ScriptedCheckpoint:
    """Writes config.json, model.safetensors, generation_config.json and the tokenizer files to out_dir.
    The entries are the last two tokens of prompts rendered with `chat_template` (qwenstack's by default).
    With `after_tool`, a thinking-on prompt holding a tool result (</tool_response>) leads to that text instead."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rust_tokenizer, script_ids, answer_ids, after_ids = _build_tokenizer(script, after_tool)
    save_tokenizer(rust_tokenizer, out_dir, chat_template)
    tokenizer = Tokenizer.from_dir(out_dir)
    eos = tokenizer.token_to_id("<|im_end|>")
    assert eos is not None
    on_key, closed_keys = _entry_keys(tokenizer)
    sequences = [[*on_key, *script_ids]] + [[*key, *answer_ids] for key in closed_keys]
    table = _transitions(sequences)
    tool = _ToolHead() if after_tool is not None else None
    tool_end = tokenizer.token_to_id("</tool_response>")
    after_seq = [*on_key, *after_ids]
    if tool is not None:
        after_table = _transitions([after_seq])
        del after_table[on_key]  # the entry: told apart by the tool feature
        for key, nxt in after_table.items():
            if table.setdefault(key, nxt) != nxt:
                raise ValueError(f"the after-tool script needs token {key[1]} after {key[0]} to lead elsewhere")

    # Successors by current token: unique -> a rule on the current token; several -> rules on the previous one.
    by_cur: dict[int, set[int]] = {}
    for (_, cur), nxt in table.items():
        by_cur.setdefault(cur, set()).add(nxt)
    pair_rules = {key: nxt for key, nxt in table.items() if len(by_cur[key[1]]) > 1}
    prevs = sorted({p for p, _ in pair_rules} | ({on_key[0]} if tool else set()))
    slotted = sorted(set(by_cur) | set(prevs) | ({tool_end, on_key[1]} if tool else set()))
    cur_slot = {t: 2 + i for i, t in enumerate(slotted)}  # 0: constant, 1: every other token
    prev_slot = {t: 2 + len(slotted) + i for i, t in enumerate(prevs)}
    hidden = 2 + len(slotted) + len(prevs)
    seen_slot, entry_slot = hidden, hidden + 1  # only with a tool head
    hidden += 2 if tool else 0
    head_dim = max(64, 64 * math.ceil(len(prevs) / 64))
    if tool:
        head_dim = max(tool.head_dim, head_dim)
        tool = _ToolHead(head_dim=head_dim, seen_pairs=(head_dim // 2 - 8, head_dim // 2))
    vocab_size = tokenizer.vocab_size

    # Residual stream after the layer: e_0 + e_cur_slot (+ e_prev_slot); the final norm scales it to
    # sqrt(hidden / 3) per entry (sqrt(hidden / 2) without a previous-token feature; with a tool head, up to
    # five features: + seen + entry).
    unit = MARGIN / math.sqrt(hidden / (5 if tool else 3))
    lm_head = torch.zeros(vocab_size, hidden)
    lm_head[eos, 1] = 4 * unit  # unknown token: end
    for t in set(slotted) - set(by_cur):
        lm_head[eos, cur_slot[t]] = 4 * unit  # a token with a slot only as a previous token: end
    for cur, nexts in by_cur.items():
        if len(nexts) == 1:
            lm_head[next(iter(nexts)), cur_slot[cur]] = 4 * unit
        else:
            lm_head[eos, cur_slot[cur]] = 1.5 * unit  # unknown previous token: end
    for (prev, cur), nxt in pair_rules.items():
        lm_head[nxt, prev_slot[prev]] = 2 * unit
        lm_head[nxt, cur_slot[cur]] = 1 * unit
    if tool:
        lm_head[after_seq[2], entry_slot] = 6 * unit
        lm_head[table[on_key], entry_slot] = -4 * unit

    # The MLP (zero without a tool head): one unit fires on seen AND current == entry[1] AND previous == entry[0]
    # (features all equal in the normalized input, so the threshold 2.65 of them holds at any count).
    inter = 8
    gate_proj = torch.zeros(inter, hidden)
    up_proj = torch.zeros(inter, hidden)
    down_proj = torch.zeros(hidden, inter)
    if tool:
        r4 = math.sqrt(hidden / 4)  # the normalized feature value when the unit fires (4 features on)
        alpha = 20 / (0.35 * r4)
        for slot in (seen_slot, cur_slot[on_key[1]], prev_slot[on_key[0]]):
            gate_proj[0, slot] = alpha
        gate_proj[0, 0] = -2.65 * alpha
        up_proj[0, 0] = 1 / r4
        down_proj[entry_slot, 0] = 1 / (20 * torch.sigmoid(torch.tensor(20.0)).item())

    def rms(h: torch.Tensor) -> torch.Tensor:
        return h / h.pow(2).mean().sqrt()

    def logits_after(prev: int | None, cur: int, seen: bool) -> torch.Tensor:
        h = torch.zeros(hidden)
        h[0] = 1
        h[cur_slot.get(cur, 1)] = 1
        if prev in prev_slot:
            h[prev_slot[prev]] = 1
        if seen:
            h[seen_slot] = 1
        x = rms(h)
        h = h + down_proj @ (torch.nn.functional.silu(gate_proj @ x) * (up_proj @ x))
        return lm_head @ rms(h)

    checked = [(seq, False) for seq in sequences] + ([(after_seq, True)] if tool else [])
    for seq, seen in checked:  # the ideal forward pass must follow every sequence with the full margin
        for i in range(1, len(seq) - 1):
            top2 = torch.topk(logits_after(seq[i - 1], seq[i], seen), 2)
            if top2.indices[0] != seq[i + 1] or top2.values[0] - top2.values[1] < 0.99 * MARGIN:
                raise ValueError(f"the script is ambiguous for this construction at token {seq[i]} after {seq[i - 1]}")

    embed = torch.zeros(vocab_size, hidden)
    embed[:, 0] = 1
    embed[:, 1] = 1
    for t, slot in cur_slot.items():
        embed[t, 1] = 0
        embed[t, slot] = 1
    norm_in = math.sqrt(hidden / 2)  # every embedding has two ones: RMSNorm scales entries to this
    heads = 2 if tool else 1
    q_proj = torch.zeros(heads * head_dim, hidden)
    k_proj = torch.zeros(heads * head_dim, hidden)
    v_proj = torch.zeros(heads * head_dim, hidden)
    o_proj = torch.zeros(hidden, heads * head_dim)
    for j, p in enumerate(prevs):
        v_proj[j, cur_slot[p]] = 1 / norm_in
        o_proj[prev_slot[p], j] = 1
    if tool is None:
        q_proj[:, 0] = 1 / norm_in  # constant all-ones query and key; q_norm / k_norm weights shape them
        k_proj[:, 0] = 1 / norm_in
        q_norm, k_norm = _rope_peak(head_dim, max_position_embeddings)
    else:
        prev_dims, seen_dims = tool.prev_dims(), tool.dims()
        q_proj[prev_dims, 0] = 1 / norm_in  # head 1: constant query and key on the fast pairs
        k_proj[prev_dims, 0] = 1 / norm_in
        q_norm, k_norm = _rope_peak(head_dim, max_position_embeddings, tool.theta, tool.prev_pairs)
        q_norm, k_norm = q_norm / math.sqrt(head_dim / len(prev_dims)), k_norm / math.sqrt(head_dim / len(prev_dims))
        # head 2: constant query, a key only on </tool_response>; score TOOL_GAP there, 0 elsewhere
        q_proj[[head_dim + d for d in seen_dims], 0] = 1 / norm_in
        k_proj[[head_dim + d for d in seen_dims], cur_slot[tool_end]] = 1 / norm_in
        w = math.sqrt(TOOL_GAP * math.sqrt(head_dim) / head_dim)  # len(seen_dims) * (head_dim/len) * w^2 / sqrt(hd)
        q_norm[seen_dims] = w
        k_norm[seen_dims] = w
        v_proj[head_dim, cur_slot[tool_end]] = 1 / norm_in
        o_proj[seen_slot, head_dim] = 1
    layer = "model.layers.0."
    state = {
        "model.embed_tokens.weight": embed,
        layer + "input_layernorm.weight": torch.ones(hidden),
        layer + "post_attention_layernorm.weight": torch.ones(hidden),
        layer + "self_attn.q_proj.weight": q_proj,
        layer + "self_attn.k_proj.weight": k_proj,
        layer + "self_attn.v_proj.weight": v_proj,
        layer + "self_attn.o_proj.weight": o_proj,
        layer + "self_attn.q_norm.weight": q_norm,
        layer + "self_attn.k_norm.weight": k_norm,
        layer + "mlp.gate_proj.weight": gate_proj,
        layer + "mlp.up_proj.weight": up_proj,
        layer + "mlp.down_proj.weight": down_proj,  # MLP output zero without a tool head
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": lm_head,
    }
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    theta = tool.theta if tool else ROPE_THETA
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": heads, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
        "attention_bias": False, "use_sliding_window": False, "bos_token_id": None, "eos_token_id": eos,
        "pad_token_id": tokenizer.token_to_id("<|endoftext|>"), "dtype": str(dtype).removeprefix("torch."),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}) + "\n")
    return ScriptedCheckpoint(out_dir, script, _answer(script), script_ids, answer_ids,
                              after_tool, after_ids or None)


def build_case(out_dir: str | Path, name: str, **options: object) -> ScriptedCheckpoint:
    """One of CASES, e.g. build_case(tmp / "tools", "parallel_tool_calls")."""
    if name not in CASES:
        raise KeyError(f"unknown scripted case {name!r}; known: {', '.join(sorted(CASES))}")
    return build_scripted_checkpoint(out_dir, CASES[name], **options)  # type: ignore[arg-type]
