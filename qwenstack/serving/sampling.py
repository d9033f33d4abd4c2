"""An API request's sampling fields -> the engine's SamplingParams.

Omitted fields take the checkpoint's generation_config.json values, then the engine's defaults; values
out of range are refused by SamplingParams itself with a RequestError that names the field (a 400).
"""
from __future__ import annotations

from typing import Any

import torch

from qwenstack.engine.params import LogitsProcessor, SamplingParams
from qwenstack.serving.errors import bad_request
from qwenstack.serving.protocol import _SamplingFields
from qwenstack.serving.served import ServedModel
from qwenstack.serving.vllm_extras import restriction_processors


class LogitBias:
    """OpenAI's logit_bias: add a fixed value to chosen tokens' logits. Stateless, so samples share it."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.ids.to(logits.device)] += self.values.to(logits.device)
        return logits


def logit_bias_processor(bias: dict[str, float] | None, vocab_size: int) -> LogitBias | None:
    if not bias:
        return None
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                              param="logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        parsed[token] = float(value)
    return LogitBias(parsed)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def sampling_params(
    request: _SamplingFields,
    served: ServedModel,
    *,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    processors: list[LogitsProcessor] | None = None,
) -> SamplingParams:
    defaults = served.generation_defaults

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(request, name)
        return value if value is not None else defaults.get(name, fallback)

    procs = list(processors or [])
    vocab_size = served.engine.engine.vocab_size
    bias = logit_bias_processor(request.logit_bias, vocab_size)
    if bias is not None:
        procs.append(bias)
    procs += restriction_processors(request, served.tokenizer, vocab_size)
    if request.prompt_logprobs is not None:  # vLLM's field, beside what the route asks for (echo's)
        prompt_logprobs = max(prompt_logprobs or 0, request.prompt_logprobs)
    return SamplingParams(
        n=request.n,
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=int(pick("top_k", 0)),
        min_p=float(pick("min_p", 0.0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=float(pick("presence_penalty", 0.0)),
        frequency_penalty=float(pick("frequency_penalty", 0.0)),
        seed=request.seed,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        stop=stop_list(request.stop),
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        include_stop_str_in_output=request.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=request.skip_special_tokens,
        logits_processors=procs,
    )
