"""vLLM's request extras on /v1/chat/completions and /v1/completions, as RL and evaluation frameworks send them.

- `allowed_token_ids`: only these tokens may be sampled (vLLM's mask; end of sequence too only if listed).
- `bad_words`: words never generated. As vLLM does, each word is tokenized alone and after a space; a one-token
  word is banned outright, a longer one has its last token banned wherever the output already ends with the rest.
- `prompt_logprobs`: per prompt token, `{token id: {logprob, rank, decoded_token}}` for the token itself and the
  k most likely there (logprobs.prompt_logprobs_out). Chat answers it at the top level, completions per choice,
  as vLLM does; a streamed request cannot ask for it (a 400, vLLM's rule).
- `return_token_ids`: the prompt's ids (`prompt_token_ids`) and each choice's generated ids (`token_ids`), streamed
  as each chunk's new ids.
- `truncate_prompt_tokens` (completions and embeddings): keep the prompt's last k tokens (-1: as many as the
  context holds), so a long prompt is cut instead of refused (vLLM's left truncation).
"""
from __future__ import annotations

from typing import Any

import torch

from qwenstack.engine.params import LogitsProcessor
from qwenstack.serving.errors import bad_request
from qwenstack.tokenizer import Tokenizer


class AllowedTokens:
    """Every logit but the allowed tokens' set to -inf. Stateless, so samples share it."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        ids = self.ids.to(logits.device)
        kept = logits[ids]
        logits.fill_(float("-inf"))
        logits[ids] = kept
        return logits


class BadWords:
    """Bans the last token of each bad word's token sequence wherever the output ends with the sequence's other
    tokens (a one-token word: everywhere). Reads only the output so far, so samples share it."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.always = torch.tensor(sorted({s[0] for s in sequences if len(s) == 1}), dtype=torch.long)
        self.after = [(s[:-1], s[-1]) for s in sequences if len(s) > 1]

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.always.numel():
            logits[self.always.to(logits.device)] = float("-inf")
        for prefix, last in self.after:
            if len(output_token_ids) >= len(prefix) and output_token_ids[-len(prefix):] == prefix:
                logits[last] = float("-inf")
        return logits


def restriction_processors(request: Any, tokenizer: Tokenizer, vocab_size: int) -> list[LogitsProcessor]:
    """The processors for a request's allowed_token_ids and bad_words (none when it sets neither)."""
    procs: list[LogitsProcessor] = []
    allowed = request.allowed_token_ids
    if allowed is not None:
        outside = next((t for t in allowed if not 0 <= t < vocab_size), None)
        if outside is not None:
            raise bad_request(f"allowed_token_ids: token id {outside} is outside the vocabulary (0..{vocab_size - 1})",
                              param="allowed_token_ids")
        procs.append(AllowedTokens(allowed))
    if request.bad_words:
        sequences = []
        for word in request.bad_words:
            for spelling in (word.lstrip(), " " + word.lstrip()):
                ids = tokenizer.encode(spelling)
                if ids and ids not in sequences:
                    sequences.append(ids)
        if sequences:
            procs.append(BadWords(sequences))
    return procs


def truncation_length(value: int | None, limit: int) -> int | None:
    """The prompt tokens truncate_prompt_tokens keeps (None: no truncation), `limit` being the most a prompt may
    have; 400 for a value above it or one that keeps nothing."""
    if value is None:
        return None
    if value == -1:
        return limit
    if value < 1:
        raise bad_request(f"truncate_prompt_tokens must be -1 or at least 1, got {value}",
                          param="truncate_prompt_tokens")
    if value > limit:
        raise bad_request(f"truncate_prompt_tokens ({value}) is more than the {limit} prompt tokens this model's "
                          f"context holds", param="truncate_prompt_tokens")
    return value


def last_tokens(tokenizer: Tokenizer, text: str, keep: int, max_token_chars: int,
                add_special_tokens: bool = False) -> list[int]:
    """The last `keep` token ids of a text, without tokenizing more of a huge text than those can span (the cut
    lands at least 3 * keep tokens before them, so the kept tokens are those of the whole text)."""
    span = keep * max_token_chars * 4
    ids = tokenizer.encode(text[-span:] if len(text) > span else text, add_special_tokens=add_special_tokens)
    return ids[-keep:]
