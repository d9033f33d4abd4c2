"""Fill-in-the-middle for Qwen's code models (Qwen3-Coder, Qwen2.5-Coder), as editors ask for it: the text before
the cursor and the text after it, the model writing what goes between.

    /v1/completions `suffix`, Ollama's /api/generate `suffix`, llama.cpp's POST /infill

Decisions:
- The prompt is Qwen's prefix-suffix-middle form, built from token ids so no text the client sends can pose as a
  marker: `<|fim_prefix|>` before the prefix, `<|fim_suffix|>` before the suffix, `<|fim_middle|>` where the answer
  begins (llama.cpp's `prompt` after it). Files of the repository (llama.cpp's `input_extra`) come first, in Qwen's
  repository-level form: `<|repo_name|>` and a name, then `<|file_sep|>` before each file's path and text.
- The answer ends at the end-of-text token or at any FIM or repository marker (the model starting another
  section), as Qwen's examples stop it.
- A model whose tokenizer lacks the three FIM tokens cannot infill: a 400 naming the field, as Ollama answers
  "does not support insert" (and vLLM refuses `suffix` always).
"""
from __future__ import annotations

from qwenstack.serving.errors import bad_request
from qwenstack.serving.served import ServedModel
from qwenstack.tokenizer import Tokenizer

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
REPO_NAME, FILE_SEP = "<|repo_name|>", "<|file_sep|>"
STOP_MARKERS = ("<|endoftext|>", "<|im_end|>", FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, "<|fim_pad|>", REPO_NAME, FILE_SEP)
REPO = "repo"  # the repository's name in the repository-level form: clients send files, not a name


def can_infill(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(m) is not None for m in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))


def infill_ids(served: ServedModel, prefix: str, suffix: str, *, middle: str = "",
               files: list[tuple[str, str]] | None = None, param: str = "suffix") -> list[int]:
    """The prompt's ids: the repository's files (path, text) if any, then prefix, suffix and the middle begun;
    400 for a model that cannot infill or a prompt the context cannot hold."""
    tokenizer = served.tokenizer
    if not can_infill(tokenizer):
        raise bad_request(f"'{served.name}' does not support insert: its tokenizer has no fill-in-the-middle tokens "
                          f"({FIM_PREFIX}, {FIM_SUFFIX}, {FIM_MIDDLE}); Qwen's Coder models have them", param=param)
    served.check_text_fits(prefix + suffix + middle + "".join(text for _, text in files or []), "prompt")
    ids: list[int] = []
    repo, sep = tokenizer.token_to_id(REPO_NAME), tokenizer.token_to_id(FILE_SEP)
    if files and repo is not None and sep is not None:
        ids += [repo] + tokenizer.encode(REPO + "\n")
        for path, text in files:
            ids += [sep] + tokenizer.encode(f"{path}\n{text}\n")
    elif files:  # no repository markers: the files' texts go before the prefix
        prefix = "".join(f"{text}\n" for _, text in files) + prefix
    ids += [tokenizer.token_to_id(FIM_PREFIX)] + tokenizer.encode(prefix)  # type: ignore[list-item]
    ids += [tokenizer.token_to_id(FIM_SUFFIX)] + tokenizer.encode(suffix)  # type: ignore[list-item]
    ids += [tokenizer.token_to_id(FIM_MIDDLE)] + tokenizer.encode(middle)  # type: ignore[list-item]
    served.check_ids_fit(ids, "prompt")
    return ids


def infill_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokens that end a middle: end of text and every FIM or repository marker the tokenizer has."""
    return [i for i in (tokenizer.token_to_id(m) for m in STOP_MARKERS) if i is not None]
