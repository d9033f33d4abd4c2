"""The tokenizer a GGUF file carries (tokenizer.ggml.*), rebuilt as a `tokenizers` byte-level BPE.

llama.cpp's converter stores a GPT-2-style BPE as: the vocabulary in id order (`tokens`), each token's
type (`token_type`: 1 normal, 3 control, 4 user-defined, 5 unused padding), the merges as "a b" strings,
and the pre-tokenizer by name (`pre`): for Qwen2/Qwen3 "qwen2" (NFC, then Qwen2's split pattern, then the
byte-level mapping), for a plain GPT-2 regex "gpt-2". A pre-tokenizer we do not know is refused: a wrong
one would encode differently without any error.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from qwenstack.errors import CheckpointError, UnsupportedModelError
from qwenstack.tokenizer import Tokenizer

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5/3 model).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4
PRE_TOKENIZERS = ("qwen2", "gpt-2", "default")


def _pre_tokenizer(name: str) -> tuple[Any, Any]:
    """(normalizer, pre-tokenizer) for a llama.cpp pre-tokenizer name."""
    if name == "qwen2":
        split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level])
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def tokenizer_from_metadata(meta: dict[str, Any], source: str = "the GGUF file") -> Tokenizer:
    """meta: the file's key-value metadata (strings, numbers, lists); source: the file, for errors."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise CheckpointError(f"{source} has no tokenizer (no 'tokenizer.ggml.model' metadata)")
    if model != "gpt2":
        raise UnsupportedModelError(f"tokenizer.ggml.model '{model}' is not supported (Qwen GGUF files use 'gpt2' BPE)")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(f"tokenizer.ggml.pre '{pre}' is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):  # without merges BPE spells letter by letter
        if not isinstance(meta.get(key), list) or not meta[key]:
            raise CheckpointError(f"{source} has no '{key}' (llama.cpp refuses such a file too)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    normalizer, pre_tokenizer = _pre_tokenizer(pre)
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # Added tokens are matched before BPE; ids come from the vocabulary, where they already are.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    special: dict[str, str] = {}
    for key, field in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        token_id = meta.get(f"tokenizer.ggml.{field}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            special[key] = tokens[token_id]
    eos_ids = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(backend, template, special, list(dict.fromkeys(eos_ids)))
