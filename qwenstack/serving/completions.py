"""POST /v1/completions: raw prompts in, raw text out (no template, no parsing: `<think>` and `<tool_call>`
markup is returned as generated, which is what BFCL's Qwen handler and evaluation harnesses expect).

Decisions:
- `prompt` may be a string, a list of strings, a list of token ids or a list of such lists; each prompt is
  its own engine request, run concurrently; choice i*n+j is sample j of prompt i, as OpenAI orders them.
- `echo` with `logprobs` returns the prompt's tokens with their logprobs (the first is null: nothing
  predicts it) followed by the completion's, in the legacy shape lm-evaluation-harness reads. With
  `max_tokens: 0` (scoring only) one token is generated and dropped, since the engine always samples.
- Structured output applies to the text generated, as in vLLM: response_format, structured_outputs, the
  guided_* fields, llama.cpp's grammar and json_schema (constraints.answer_processors).
- `suffix` asks a Coder model to fill in the middle (infill.py): each text prompt is the text before the cursor.
- vLLM's extras (prompt_logprobs, return_token_ids, allowed_token_ids, bad_words, truncate_prompt_tokens) as
  vllm_extras.py describes them.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from qwenstack.engine.outputs import CompletionOutput, RequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.serving.constraints import ThinkingPhase, answer_processors
from qwenstack.serving.errors import bad_request
from qwenstack.serving.infill import infill_ids, infill_stop_ids
from qwenstack.serving.logprobs import LegacyLogprobsBuilder, TokenTexts, prompt_logprobs_out
from qwenstack.serving.metrics import RequestTracker
from qwenstack.serving.openapi import chat_responses, request_body
from qwenstack.serving.protocol import (
    CompletionChoice, CompletionRequest, CompletionResponse, LegacyLogprobs, PromptTokensDetails, Usage,
)
from qwenstack.serving.sampling import sampling_params
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import local_or_forwarded
from qwenstack.serving.streaming import CLIENT_LEFT, admit, event_stream, merge, reply, sse
from qwenstack.serving.vllm_extras import last_tokens, truncation_length

router = APIRouter()


@dataclass
class Prompt:
    text: str
    ids: list[int]


@dataclass
class CompletionPlan:
    request_id: str
    created: int
    served: ServedModel
    request: CompletionRequest
    prompts: list[Prompt]
    params: SamplingParams
    drop_output: bool  # max_tokens 0: the one generated token only served to score the prompt

    @property
    def n(self) -> int:
        return self.params.n

    def token_texts(self) -> TokenTexts | None:
        return TokenTexts(self.served.tokenizer) if self.request.logprobs is not None else None

    def builder(self, texts: TokenTexts | None) -> LegacyLogprobsBuilder | None:
        if texts is None or self.request.logprobs is None:
            return None
        return LegacyLogprobsBuilder(texts, self.request.logprobs)


def prompts_of(request: CompletionRequest, served: ServedModel) -> list[Prompt]:
    tok = served.tokenizer
    raw = request.prompt
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise bad_request("prompt is empty", param="prompt")
    keep = truncation_length(request.truncate_prompt_tokens, served.prompt_token_limit)
    if request.suffix:
        return [infill_prompt(served, request, p) for p in texts]
    if isinstance(texts[0], str):
        if keep is None:
            return [Prompt(p, served.encode_prompt(p, "prompt")) for p in texts]  # type: ignore[arg-type]
        kept = [last_tokens(tok, p, keep, served.max_token_chars) for p in texts]  # type: ignore[arg-type]
        return [Prompt(tok.decode(ids), ids) for ids in kept]
    lists = [raw] if isinstance(raw[0], int) else raw
    if keep is not None:
        lists = [ids[-keep:] for ids in lists]  # type: ignore[index]
    for ids in lists:  # checked before decoding: the tokenizer cannot decode what is not in the vocabulary
        if not ids:
            raise bad_request("prompt has an empty list of token ids", param="prompt")
        served.check_ids_fit(ids, "prompt")  # type: ignore[arg-type]
        served.check_token_ids(ids, "prompt")  # type: ignore[arg-type]
    return [Prompt(tok.decode(ids), list(ids)) for ids in lists]  # type: ignore[arg-type]


def infill_prompt(served: ServedModel, request: CompletionRequest, prefix: Any) -> Prompt:
    """A fill-in-the-middle prompt (infill.py): the text prompt before the cursor, `suffix` after it."""
    if not isinstance(prefix, str):
        raise bad_request("suffix (fill-in-the-middle) takes text prompts, not token ids", param="prompt")
    if request.truncate_prompt_tokens is not None:
        raise bad_request("truncate_prompt_tokens is not supported with suffix: it would cut the prefix's markers",
                          param="truncate_prompt_tokens")
    return Prompt(prefix, infill_ids(served, prefix, request.suffix or ""))


def refuse_long_id_prompt(raw: dict[str, Any], served: ServedModel) -> None:
    """The raw body's prompt of token ids, refused if it cannot fit before its million items are validated:
    a list whose first item is an int is a prompt of token ids or no valid prompt at all (400 either way)."""
    prompt = raw.get("prompt")
    if raw.get("truncate_prompt_tokens") is not None:
        return  # cut to fit, not refused
    if isinstance(prompt, list) and prompt and type(prompt[0]) is int:
        served.check_ids_fit(prompt, "prompt")


def plan_completion(served: ServedModel, request: CompletionRequest) -> CompletionPlan:
    """Tokenizes (or decodes) the prompts and builds the sampling parameters: blocking, run in a thread."""
    if request.suffix and request.echo:
        raise bad_request("echo is not supported with suffix (fill-in-the-middle)", param="echo")
    if request.best_of is not None and request.best_of != request.n:
        raise bad_request("best_of is not supported (leave it out or set it equal to n)", param="best_of")
    drop_output = request.max_tokens == 0
    if drop_output and not request.echo:
        raise bad_request("max_tokens must be at least 1 (0 is only meaningful with echo)", param="max_tokens")
    want_prompt_lp = request.echo and request.logprobs is not None
    processors = answer_processors(served.tokenizer, request, ThinkingPhase.ANSWER)  # the prompt is raw text
    params = sampling_params(request, served, max_tokens=1 if drop_output else request.max_tokens,
                             logprobs=request.logprobs, prompt_logprobs=request.logprobs if want_prompt_lp else None,
                             processors=processors)
    if request.suffix:  # a middle ends where the model starts another section
        params.stop_token_ids += infill_stop_ids(served.tokenizer)
    return CompletionPlan(f"cmpl-{uuid.uuid4().hex}", int(time.time()), served, request,
                          prompts_of(request, served), params, drop_output)


def _prompt_part(plan: CompletionPlan, prompt: Prompt, out: RequestOutput,
                 builder: LegacyLogprobsBuilder | None) -> tuple[str, dict | None]:
    """What echo puts before the completion: the prompt text and its tokens' logprobs."""
    if not plan.request.echo:
        return "", None
    if builder is None:
        return prompt.text, None
    entries = list(out.prompt_logprobs or [None])
    entries += [None] * (len(prompt.ids) - len(entries))  # never shorter than the prompt, whatever the engine sent
    return prompt.text, builder.add(prompt.ids, entries[: len(prompt.ids)])


def _generated_part(plan: CompletionPlan, comp: CompletionOutput, token_ids: list[int], entries: list | None,
                    builder: LegacyLogprobsBuilder | None) -> dict | None:
    if builder is None or plan.drop_output:
        return None
    return builder.add(token_ids, entries or [None] * len(token_ids))


def _prompt_extras(plan: CompletionPlan, prompt: Prompt, out: RequestOutput) -> dict[str, Any]:
    """A prompt's vLLM extras, on each of its choices (the whole answer's, or each choice's first chunk): its
    logprobs and ids. Made once a prompt: its n choices share them."""
    fields: dict[str, Any] = {}
    if plan.request.prompt_logprobs is not None:
        fields["prompt_logprobs"] = prompt_logprobs_out(TokenTexts(plan.served.tokenizer), prompt.ids,
                                                        out.prompt_logprobs, plan.request.prompt_logprobs)
    if plan.request.return_token_ids:
        fields["prompt_token_ids"] = list(prompt.ids)
    return fields


def _token_ids(plan: CompletionPlan, token_ids: list[int]) -> dict[str, Any]:
    """A choice's generated ids, with return_token_ids (vLLM's)."""
    if not plan.request.return_token_ids:
        return {}
    return {"token_ids": [] if plan.drop_output else list(token_ids)}


def _join(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def usage(plan: CompletionPlan, finals: list[RequestOutput]) -> Usage:
    prompt_tokens = sum(len(p.ids) for p in plan.prompts)
    completion = 0 if plan.drop_output else sum(len(c.token_ids) for f in finals for c in f.outputs)
    cached = sum(f.metrics.num_cached_tokens for f in finals)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def complete(plan: CompletionPlan, streams: list[AsyncIterator[RequestOutput]],
                   tracker: RequestTracker) -> Response:
    try:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, out in merge(streams):
            tracker.on_output(out)
            if out.finished:
                tracker.on_finished(out)
                finals[i] = out
        texts = plan.token_texts()
        choices = []
        for i, (prompt, final) in enumerate(zip(plan.prompts, finals)):
            assert final is not None
            prompt_extras = _prompt_extras(plan, prompt, final)
            for comp in final.outputs:
                builder = plan.builder(texts)
                head, head_lp = _prompt_part(plan, prompt, final, builder)
                text = head + ("" if plan.drop_output else comp.text)
                lp = _join(head_lp, _generated_part(plan, comp, comp.token_ids, comp.logprobs, builder))
                choices.append(CompletionChoice(index=i * plan.n + comp.index, text=text,
                                                logprobs=LegacyLogprobs(**lp) if lp is not None else None,
                                                finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                                                **prompt_extras, **_token_ids(plan, comp.token_ids)))
        body = CompletionResponse(id=plan.request_id, created=plan.created, model=plan.served.name,
                                  choices=choices, usage=usage(plan, [f for f in finals if f is not None]))
        return Response(body.model_dump_json(), media_type="application/json")
    finally:
        tracker.done(len(streams))


async def stream_completion(plan: CompletionPlan, streams: list[AsyncIterator[RequestOutput]],
                            tracker: RequestTracker) -> AsyncIterator[str]:
    """The chunks of streamed completions (streaming.event_stream adds the error frame and [DONE])."""
    include_usage = bool(plan.request.stream_options and plan.request.stream_options.include_usage)
    base: dict[str, Any] = {"id": plan.request_id, "object": "text_completion", "created": plan.created,
                            "model": plan.served.name}
    if include_usage:
        base["usage"] = None
    texts = plan.token_texts()
    builders: dict[int, LegacyLogprobsBuilder | None] = {}
    heads: dict[int, dict[str, Any]] = {}  # each prompt's vLLM extras, for its choices' first chunks
    finished: set[int] = set()
    finals: list[RequestOutput] = []
    async for i, out in merge(streams):
        tracker.on_output(out)
        for comp in out.outputs:
            index = i * plan.n + comp.index
            if index in finished:
                continue
            text, lp, first = "", None, index not in builders
            if first:  # this choice's first chunk carries the echoed prompt
                builders[index] = plan.builder(texts)
                text, lp = _prompt_part(plan, plan.prompts[i], out, builders[index])
            if not plan.drop_output:
                text += comp.delta_text
                lp = _join(lp, _generated_part(plan, comp, comp.delta_token_ids, comp.delta_logprobs,
                                               builders[index]))
            if comp.finished:
                finished.add(index)
            if first and i not in heads:
                heads[i] = _prompt_extras(plan, plan.prompts[i], out)
            extras = {**(heads[i] if first else {}), **_token_ids(plan, comp.delta_token_ids)}
            if text or lp or comp.finished or extras.get("token_ids") or "prompt_token_ids" in extras:
                choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": comp.finish_reason, **extras}
                if comp.finished:
                    choice["stop_reason"] = comp.stop_reason  # vLLM's, as in the whole response
                yield sse({**base, "choices": [choice]})
        if out.finished:
            tracker.on_finished(out)
            finals.append(out)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(plan, finals).model_dump()})


@router.post("/v1/completions", responses=chat_responses(CompletionResponse))
@request_body(CompletionRequest)
async def create_completion(request: Request) -> Response:
    arrival = time.monotonic()
    local = await local_or_forwarded(request, CompletionRequest, "/completions", refuse_long_id_prompt)
    if isinstance(local, Response):
        return local
    state, completion_request, served = local.state, local.body, local.served
    plan = await asyncio.to_thread(plan_completion, served, completion_request)
    retry = state.config.retry_after_s
    engine_streams = [served.engine.generate(p.ids, plan.params, request_id=f"{plan.request_id}-{i}", prompt=p.text)
                      for i, p in enumerate(plan.prompts)]
    streams = await admit(request, engine_streams, retry)
    if streams is None:
        return Response(status_code=CLIENT_LEFT)
    tracker = state.metrics.track(served.name, arrival)
    return await reply(request, bool(completion_request.stream),
                       lambda: event_stream(stream_completion(plan, streams, tracker), retry,
                                            on_end=lambda: tracker.done(len(streams))),
                       lambda: complete(plan, streams, tracker), sources=streams)
