"""llama.cpp server's native routes, for the clients written against `llama-server` (SillyTavern, Continue's
llama.cpp provider, llama.vim and llama.vscode, scripts): POST /completion, POST /infill (fill-in-the-middle,
serving/infill.py) and GET /props. (Its /tokenize `content` and /detokenize reply's
`content` are app.py's /tokenize and /detokenize, which take both spellings.)

Decisions:
- /completion is /v1/completions underneath: the body becomes a CompletionRequest (n_predict -> max_tokens, -1
  or absent: up to the context's end, 0: the prompt evaluated and nothing returned, as llama.cpp primes its
  cache; repeat_penalty -> repetition_penalty; a negative seed: random; grammar (GBNF) and json_schema as on
  /v1/completions), planned by completions.py, so sampling, structured output, stops and errors are the same.
  Options this engine has no counterpart for (mirostat, typical_p, samplers, cache_prompt, id_slot, n_probs...)
  are accepted and ignored; the prefix cache is always on.
- The answer is llama.cpp's: {"content", "stop": true, "stop_type" ("eos", "word" or "limit"),
  "stopping_word", "tokens_predicted", "tokens_evaluated", "tokens_cached", "truncated", "model", "prompt",
  "timings"}. Streamed, each SSE `data:` line is {"content", "stop": false}, and the last one carries the
  whole answer's fields with stop: true and no content; no [DONE] line, as llama.cpp sends none. Errors keep
  this server's OpenAI shape.
- `model` may be left out when one model is served (llama-server serves one).
- /props tells what clients read from it: default_generation_settings.n_ctx, total_slots (the engine's
  max_num_seqs), model_path (the served name), chat_template and build_info.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from qwenstack import __version__
from qwenstack.engine.outputs import RequestOutput
from qwenstack.serving.completions import CompletionPlan, plan_completion, refuse_long_id_prompt
from qwenstack.serving.infill import infill_ids, infill_stop_ids
from qwenstack.serving.openapi import chat_responses, request_body
from qwenstack.serving.protocol import INT64_MAX, INT64_MIN, MAX_COUNT, CompletionRequest, _Request
from qwenstack.serving.state import get_state, parse_off_loop, read_json
from qwenstack.serving.streaming import CLIENT_LEFT, admit, event_stream, reply, sse

router = APIRouter()


class LlamaCompletionRequest(_Request):
    prompt: str | list[int]
    model: str | None = None
    n_predict: int = Field(-1, ge=-2, le=MAX_COUNT)  # -1 (and -2): until the context's end; 0: prompt only
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=-1, le=MAX_COUNT)  # 0: off, as in llama.cpp
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # negative (llama.cpp's -1): random
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    ignore_eos: bool = False
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None


class InfillFile(_Request):
    filename: str = ""
    text: str


class LlamaInfillRequest(LlamaCompletionRequest):
    prompt: str = ""  # the middle's beginning, written after <|fim_middle|>
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillFile] = Field(default_factory=list)  # the repository's other files


class LlamaTimings(BaseModel):
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float | None


class LlamaCompletionResponse(BaseModel):
    """The whole answer (the last streamed line has these fields too, with empty content)."""

    content: str
    stop: bool
    model: str
    prompt: str
    stop_type: str  # "eos", "word" or "limit"
    stopping_word: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    truncated: bool
    timings: LlamaTimings


def completion_request(body: LlamaCompletionRequest, model: str) -> CompletionRequest:
    fields: dict[str, Any] = {
        "model": model, "prompt": body.prompt,
        # 0: one token is generated (the engine always samples) and dropped
        "max_tokens": 1 if body.n_predict == 0 else (body.n_predict if body.n_predict > 0 else None),
        "temperature": body.temperature, "top_k": body.top_k or None, "top_p": body.top_p, "min_p": body.min_p,
        "seed": body.seed if body.seed is not None and body.seed >= 0 else None, "stop": body.stop,
        "repetition_penalty": body.repeat_penalty, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "ignore_eos": body.ignore_eos, "grammar": body.grammar,
        "json_schema": body.json_schema}
    return CompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 3)


def final_fields(out: RequestOutput, model: str, prompt: str, prompt_tokens: int,
                 prompt_only: bool = False) -> dict[str, Any]:
    """The fields of llama.cpp's last answer (whole or streamed): why it stopped, the counts, the timings.
    prompt_only (n_predict 0): the one generated token does not count."""
    comp, m, now = out.outputs[0], out.metrics, time.monotonic()
    first = m.first_token_time or now
    started = m.first_scheduled_time or m.arrival_time
    predicted_ms, prompt_ms = _ms((m.last_token_time or now) - first), _ms(first - started)
    predicted = 0 if prompt_only else len(comp.token_ids)
    word = "" if prompt_only or not isinstance(comp.stop_reason, str) else comp.stop_reason
    limited = prompt_only or comp.finish_reason == "length"
    return {"stop": True, "model": model, "prompt": prompt,
            "stop_type": "limit" if limited else ("word" if word else "eos"),
            "stopping_word": word, "tokens_predicted": predicted, "tokens_evaluated": prompt_tokens,
            "tokens_cached": m.num_cached_tokens, "truncated": False,
            "timings": {"prompt_n": prompt_tokens - m.num_cached_tokens, "prompt_ms": prompt_ms,
                        "predicted_n": predicted, "predicted_ms": predicted_ms,
                        "predicted_per_second": predicted / predicted_ms * 1000 if predicted_ms else None}}


@router.post("/completion", responses=chat_responses(LlamaCompletionResponse))
@request_body(LlamaCompletionRequest)
async def completion(request: Request) -> Response:
    state = get_state(request)
    raw = await read_json(request)
    body = await parse_off_loop(LlamaCompletionRequest, raw, request)
    served = state.registry.resolve(body.model)
    served.check_generates()
    refuse_long_id_prompt(raw, served)
    plan = await asyncio.to_thread(plan_completion, served, completion_request(body, served.name))
    return await answer(request, body, plan)


@router.post("/infill", responses=chat_responses(LlamaCompletionResponse))
@request_body(LlamaInfillRequest)
async def infill(request: Request) -> Response:
    """llama.cpp's fill-in-the-middle: input_prefix and input_suffix around the cursor, input_extra the
    repository's other files, prompt the middle's beginning (infill.py builds the prompt)."""
    state = get_state(request)
    body = await parse_off_loop(LlamaInfillRequest, await read_json(request), request)
    served = state.registry.resolve(body.model)
    served.check_generates()

    def plan_infill() -> CompletionPlan:
        files = [(f.filename, f.text) for f in body.input_extra]
        ids = infill_ids(served, body.input_prefix, body.input_suffix, middle=body.prompt, files=files,
                         param="input_suffix")
        plan = plan_completion(served, completion_request(body.model_copy(update={"prompt": ids}), served.name))
        plan.params.stop_token_ids += infill_stop_ids(served.tokenizer)
        return plan

    return await answer(request, body, await asyncio.to_thread(plan_infill))


async def answer(request: Request, body: LlamaCompletionRequest, plan: CompletionPlan) -> Response:
    """A planned /completion or /infill, answered in llama.cpp's shape (streamed as its SSE lines)."""
    state, served = get_state(request), plan.served
    prompt, prompt_only = plan.prompts[0], body.n_predict == 0
    tracker = state.metrics.track(served.name, time.monotonic())
    engine_stream = served.engine.generate(prompt.ids, plan.params, request_id=plan.request_id, prompt=prompt.text)
    streams = await admit(request, [engine_stream], state.config.retry_after_s)
    if streams is None:
        return Response(status_code=CLIENT_LEFT)

    async def outputs() -> AsyncIterator[RequestOutput]:
        async for out in streams[0]:
            tracker.on_output(out)
            if out.finished:
                tracker.on_finished(out)
            yield out

    async def events() -> AsyncIterator[str]:
        async for out in outputs():
            if out.outputs[0].delta_text and not prompt_only:
                yield sse({"content": out.outputs[0].delta_text, "stop": False})
            if out.finished:
                yield sse({"content": "", **final_fields(out, served.name, prompt.text, len(prompt.ids),
                                                         prompt_only)})

    async def whole() -> Response:
        try:
            final = None
            async for out in outputs():
                final = out
            assert final is not None and final.finished
            answer = {"content": "" if prompt_only else final.outputs[0].text,
                      **final_fields(final, served.name, prompt.text, len(prompt.ids), prompt_only)}
            return Response(json.dumps(answer, ensure_ascii=False), media_type="application/json")
        finally:
            tracker.done(1)

    return await reply(request, body.stream, lambda: event_stream(events(), state.config.retry_after_s,
                                                                   on_end=lambda: tracker.done(1), done=None),
                       whole, sources=streams)


@router.get("/props")
def props(request: Request, model: str | None = None) -> JSONResponse:
    served = get_state(request).registry.resolve(model)
    engine_config = served.engine.engine.config
    return JSONResponse({
        "default_generation_settings": {"n_ctx": served.max_model_len, "model": served.name,
                                        "params": dict(served.generation_defaults)},
        "total_slots": engine_config.max_num_seqs, "model_path": served.name,
        "chat_template": served.tokenizer.chat_template or "", "build_info": f"qwenstack {__version__}"})
