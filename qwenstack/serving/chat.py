"""POST /v1/chat/completions: messages -> chat template -> prompt tokens -> engine -> parsed output.

Decisions:
- Thinking is on by default, as in Qwen3; `chat_template_kwargs.enable_thinking=false` or
  `reasoning_effort` "none"/"minimal" turns it off, "low"/"medium" cap it at a thinking budget (protocol.py's
  EFFORT_BUDGETS, as /v1/responses does). `/think` and `/no_think` are just text for the template.
- The output goes through the same incremental parser streamed or not, so the streamed deltas always
  reassemble to the non-streamed message. The thinking text is sent as `reasoning_content` and, with the
  same value, as `reasoning` (vLLM's and Ollama's name); never in `content`.
- tool_choice "none" renders no tools and parses no calls; "auto" renders and parses; "required" and
  a named function also force the call with a grammar (constraints.py), since a system hint alone is not
  reliable with small models. parallel_tool_calls=false keeps at most one call.
- usage counts tokens, not text: the rendered prompt's tokens, and the generated tokens (reasoning tokens
  are those of the think block).
- Images (vision models only) are rendered as Qwen3-VL's template renders an image part, one
  `<|vision_start|><|image_pad|><|vision_end|>` each, with a message's parts joined as that template joins
  them; serving/images.py loads them and expands each placeholder to the image's token count. Audio parts
  (models with an audio encoder) go the same way through serving/audio.py.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from qwenstack.chat_template import ChatTemplateError, cut_after_final_message
from qwenstack.engine.outputs import CompletionOutput, RequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.serving import audio as audio_inputs
from qwenstack.serving import chat_audio
from qwenstack.errors import ConfigError
from qwenstack.serving import images as image_inputs
from qwenstack.serving import moderation, videos
from qwenstack.markup import THINK_END, THINK_START, TURN_START
from qwenstack.serving.constraints import ThinkingPhase, binds_answer, build_processors
from qwenstack.serving.errors import APIError, bad_request
from qwenstack.serving.logprobs import TokenTexts, chat_logprobs, prompt_logprobs_out
from qwenstack.serving.metrics import RequestTracker
from qwenstack.serving.openapi import chat_responses, request_body
from qwenstack.serving.parsers import ChatOutputParser, ParsedDelta, finish_reason_for, parse_chat_output
from qwenstack.serving.protocol import (
    AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    CompletionTokensDetails, FunctionCallOut, ImagePart, PromptTokensDetails, TextPart, ToolCallOut, Usage,
)
from qwenstack.serving.sampling import sampling_params
from qwenstack.tokenizer import TooManyTokens
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import ServerState, local_or_forwarded
from qwenstack.serving.streaming import CLIENT_LEFT, EVENT_STREAM, admit, close_all, event_stream, reply, sse

router = APIRouter()

# Template variables a client may not set through chat_template_kwargs (they are arguments of the render).
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "documents"}
CONTENT_REQUIRED = {"system", "developer", "user", "tool"}  # only an assistant turn may have null content
CLIENT_TEXT_FIELDS = {"content", "name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning"}
MEDIA_KINDS = {"image_url": "vision", "input_audio": "audio", "audio_url": "audio", "video_url": "vision"}


@dataclass
class ChatPlan:
    request_id: str
    created: int
    served: ServedModel
    request: ChatCompletionRequest
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    phase: ThinkingPhase
    tools_enabled: bool
    tool_schemas: list[dict[str, Any]] | None
    guard: Any = None  # moderation.GuardContext while a guard watches this request
    image_refs: list[image_inputs.ImageRef] = field(default_factory=list)  # image parts, in prompt order
    multimodal: Any = None  # MultimodalInputs once the images are loaded (attach_images)
    audio_refs: list[audio_inputs.AudioRef] = field(default_factory=list)  # audio parts, in prompt order
    audio_answer: Any = None  # chat_audio.AudioAnswer when the answer is also spoken
    video_tracks: list[Any] | None = None  # videos' audio tracks when the request hears them (Qwen3-Omni)

    @property
    def starts_in_reasoning(self) -> bool:
        return self.phase is ThinkingPhase.THINKING

    def parser(self, stream_arguments: bool = False, parse_calls: bool = False) -> ChatOutputParser:
        """parse_calls: tool calls are parsed even when no tool is offered (their markup never leaks)."""
        return ChatOutputParser(starts_in_reasoning=self.starts_in_reasoning, thinking=self.phase.thinking,
                                tools_enabled=self.tools_enabled or parse_calls, tool_schemas=self.tool_schemas,
                                stream_arguments=stream_arguments, bound_answer=binds_answer(self.request))

    @property
    def max_calls(self) -> int | None:
        return 1 if self.request.parallel_tool_calls is False else None


# --- request -> prompt and parameters -------------------------------------------------------------------


def _same(value: Any) -> Any:
    return value


@dataclass
class VisionIds:
    """Qwen-VL templates' `add_vision_id`: "Picture 1: " / "Video 1: " before each image or video, numbered over
    the conversation. The template only sees our rendered text (no parts to count), so the labels are written
    here, and only where the template reads the flag."""

    enabled: bool = False
    images: int = 0
    videos: int = 0

    @classmethod
    def for_render(cls, template: str | None, kwargs: dict[str, Any]) -> "VisionIds":
        return cls(bool(kwargs.get("add_vision_id")) and "add_vision_id" in (template or ""))

    def label(self, video: bool) -> str:
        if not self.enabled:
            return ""
        if video:
            self.videos += 1
            return f"Video {self.videos}: "
        self.images += 1
        return f"Picture {self.images}: "


def _content_text(message: ChatMessage, index: int, capabilities: list[str], model: str,
                  images: list[image_inputs.ImageRef] | None = None, image_placeholder: str | None = None,
                  video_placeholder: str | None = None, audios: list[audio_inputs.AudioRef] | None = None,
                  audio_placeholder: str | None = None, escape: Callable[[Any], Any] = _same,
                  vision_ids: VisionIds | None = None) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return escape(content)
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(escape(part.text))
            continue
        kind = MEDIA_KINDS[part.type]
        if kind not in capabilities:
            takes = [t for t, k in MEDIA_KINDS.items() if k in capabilities]
            what = f"it takes text and {', '.join(takes)}" if takes else "it is text-only"
            raise bad_request(f"messages[{index}]: the model '{model}' does not accept {part.type} input ({what})",
                              param=f"messages.{index}.content", code="unsupported_content")
        if isinstance(part, ImagePart) and image_placeholder is not None:
            texts.append((vision_ids.label(video=False) if vision_ids else "") + image_placeholder)
            if images is not None:
                images.append(image_inputs.ImageRef(index, j, part.image_url.url))
            continue
        if part.type == "video_url" and video_placeholder is not None:
            texts.append((vision_ids.label(video=True) if vision_ids else "") + video_placeholder)
            if images is not None:
                images.append(image_inputs.ImageRef(index, j, part.video_url.url, kind="video"))
            continue
        if part.type in ("input_audio", "audio_url") and audio_placeholder is not None:
            texts.append(audio_placeholder)
            if audios is not None:
                audios.append(audio_inputs.audio_ref(index, j, part))
            continue
        if part.type == "video_url":
            raise bad_request(f"messages[{index}].content[{j}]: the model '{model}' does not accept video input",
                              param=f"messages.{index}.content.{j}", code="unsupported_content")
        raise APIError(501, f"messages[{index}]: {part.type} input is not supported by this server yet",
                       param=f"messages.{index}.content")
    # Qwen3-VL's and Omni's templates concatenate a message's parts as they are (text parts too, as vLLM renders
    # them for such models); a text model's template takes a string, for which vLLM joins the parts by lines.
    takes_media = any(p is not None for p in (image_placeholder, video_placeholder, audio_placeholder))
    return ("" if takes_media else "\n").join(texts)


def template_messages(messages: list[ChatMessage], served: ServedModel,
                      images: list[image_inputs.ImageRef] | None = None,
                      audios: list[audio_inputs.AudioRef] | None = None,
                      escape: Callable[[Any], Any] = _same,
                      vision_ids: VisionIds | None = None) -> list[dict[str, Any]]:
    """The messages as the chat template reads them; `escape` is applied to every string the client wrote
    (markers.MarkerEscaper), never to what the server adds (image placeholders, their `vision_ids` labels)."""
    placeholder = video = None
    if served.image_processor is not None:
        placeholder = image_inputs.placeholder_text(served.tokenizer, served.hf_config)
    if served.video_processor is not None:
        video = videos.placeholder_text(served.tokenizer, served.hf_config)
    audio_placeholder = served.asr.placeholder if served.asr is not None else None
    out = []
    for i, m in enumerate(messages):
        if m.content is None and m.role in CONTENT_REQUIRED:
            raise bad_request(f"messages[{i}]: a {m.role} message needs content (got null)",
                              param=f"messages.{i}.content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": _content_text(m, i, served.capabilities, served.name, images, placeholder,
                                                        video, audios, audio_placeholder, escape, vision_ids)}
        if m.name is not None:
            msg["name"] = escape(m.name)
        if m.tool_call_id is not None:
            msg["tool_call_id"] = escape(m.tool_call_id)
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            msg["reasoning_content"] = escape(reasoning)
        if m.tool_calls:
            # Templates differ: some print a string, some iterate a mapping; a JSON object is given as one.
            msg["tool_calls"] = [{"id": escape(c.id), "type": "function",
                                  "function": {"name": escape(c.function.name),
                                               "arguments": escape(_arguments(c.function.arguments))}}
                                 for c in m.tool_calls]
        out.append(msg)
    return out


def render_prompt(served: ServedModel, messages: list[ChatMessage], state: ServerState, *,
                  tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                  images: list[image_inputs.ImageRef] | None = None, audios: list[audio_inputs.AudioRef] | None = None,
                  continue_final: bool = False, **kwargs: Any) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids) of a conversation. Special tokens the client typed stay text unless
    the server allows them (ServerConfig.special_tokens_in_content). Any failure to render is a 400 naming
    the message that caused it. continue_final: the prompt ends with the last message's text (the template's
    end of turn after it cut off), so the model goes on writing it. Blocking work: run it in a worker thread."""
    tok = served.tokenizer
    if state.config.special_tokens_in_content:
        escaper = None
    else:
        escaper = served.special_token_text.escaper(
            [m.model_dump(include=CLIENT_TEXT_FIELDS) for m in messages] + [tools or []])
    escape = escaper.escape if escaper is not None else _same
    vision_ids = VisionIds.for_render(kwargs.get("chat_template") or tok.chat_template, kwargs)
    dicts = template_messages(messages, served, images, audios, escape, vision_ids)
    tool_dicts = escape(tools) if tools is not None else None
    try:
        rendered = tok.apply_chat_template(dicts, tools=tool_dicts, add_generation_prompt=add_generation_prompt,
                                           **kwargs)
    except (ChatTemplateError, ConfigError, RecursionError, MemoryError):
        raise
    except Exception as exc:  # the template met a value it cannot handle (a null, a number, ...)
        index = _failing_message(tok, dicts, tool_dicts, kwargs, type(exc))
        where = f"messages[{index}]: " if index is not None else ""
        raise bad_request(f"{where}the chat template could not render this conversation: {type(exc).__name__}: "
                          f"{exc}", param=f"messages.{index}" if index is not None else "messages") from None
    if continue_final:
        rendered = _open_final_message(rendered, dicts[-1].get("content"), len(dicts) - 1)
    if escaper is None:
        return rendered, served.encode_prompt(rendered, "messages")
    served.check_text_fits(rendered, "messages")
    try:
        return escaper.finish(rendered, max_tokens=served.prompt_token_limit)
    except TooManyTokens as exc:
        raise served.too_long(exc.count, "messages") from None


def _open_final_message(rendered: str, content: Any, index: int) -> str:
    cut = cut_after_final_message(rendered, content)
    if cut is not None:
        return cut
    raise bad_request(f"messages[{index}]: continue_final_message needs the last message to have text to continue",
                      param=f"messages.{index}.content")


def _failing_message(tok: Any, dicts: list[dict[str, Any]], tools: Any, kwargs: dict[str, Any],
                     kind: type[BaseException]) -> int | None:
    """The first message whose prefix of the conversation fails to render the same way (the first 64 only)."""
    for i in range(min(len(dicts), 64)):
        try:
            tok.apply_chat_template(dicts[: i + 1], tools=tools, add_generation_prompt=False, **kwargs)
        except kind:
            return i
        except Exception:
            continue
    return None


def _arguments(arguments: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def template_kwargs(request: ChatCompletionRequest, defaults: dict[str, Any]) -> dict[str, Any]:
    kwargs = {**defaults, **(request.chat_template_kwargs or {})}
    for key in RESERVED_TEMPLATE_KWARGS & kwargs.keys():
        raise bad_request(f"chat_template_kwargs may not set '{key}'", param="chat_template_kwargs")
    if request.thinking_off:
        kwargs["enable_thinking"] = False
    kwargs.setdefault("enable_thinking", True)
    return kwargs


def conversation_ids(served: ServedModel, messages: list[ChatMessage], state: ServerState,
                     chat_template_kwargs: dict[str, Any] | None, add_generation_prompt: bool) -> list[int]:
    """Exactly the token ids a chat request with these messages would get as its prompt (the server's template
    defaults, then the request's chat_template_kwargs), for /tokenize and the pooling routes' chat form.
    Blocking work: run it in a worker thread."""
    as_chat = ChatCompletionRequest(model=served.name, messages=messages, chat_template_kwargs=chat_template_kwargs)
    kwargs = template_kwargs(as_chat, state.config.default_chat_template_kwargs)
    return render_prompt(served, messages, state, add_generation_prompt=add_generation_prompt, **kwargs)[1]


def thinking_phase(prompt: str, enable_thinking: Any, continues_final: bool = False) -> ThinkingPhase:
    if continues_final:  # inside the continued message: thinking only when it opened a think block left open
        turn = prompt[prompt.rfind(TURN_START):]
        opened, closed = turn.rfind(THINK_START), turn.rfind(THINK_END)
        return ThinkingPhase.THINKING if opened > closed else ThinkingPhase.ANSWER
    tail = prompt.rstrip(" ")
    if tail.endswith(THINK_START + "\n") or tail.endswith(THINK_START):
        return ThinkingPhase.THINKING  # the template opened the block (Qwen3.5-style)
    if enable_thinking is False or tail.rstrip("\n").endswith(THINK_END):
        return ThinkingPhase.ANSWER
    return ThinkingPhase.MAY_THINK


def plan_chat(served: ServedModel, request: ChatCompletionRequest, state: ServerState) -> ChatPlan:
    """Renders and tokenizes the prompt and builds the sampling parameters: blocking, run in a thread."""
    tok = served.tokenizer
    kwargs = template_kwargs(request, state.config.default_chat_template_kwargs)
    tools_enabled = bool(request.tools) and request.tool_choice != "none"
    tool_dicts = [t.model_dump(exclude_none=True) for t in request.tools] if tools_enabled and request.tools else None
    if request.tool_choice not in (None, "none", "auto") and not request.tools:
        raise bad_request("tool_choice requires tools", param="tool_choice")
    if request.top_logprobs and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")
    image_refs: list[image_inputs.ImageRef] = []
    audio_refs: list[audio_inputs.AudioRef] = []
    prompt, prompt_ids = render_prompt(served, request.messages, state, tools=tool_dicts, images=image_refs,
                                       audios=audio_refs, add_generation_prompt=request.add_generation_prompt,
                                       continue_final=request.continue_final_message, **kwargs)
    phase = thinking_phase(prompt, kwargs.get("enable_thinking"), request.continue_final_message)
    processors = build_processors(tok, request, phase, tool_dicts)
    params = sampling_params(request, served, max_tokens=request.max_new_tokens,
                             logprobs=request.sampled_logprobs, processors=processors)
    params.reasoning = phase.markers()  # stop strings act on the answer, not the thinking
    return ChatPlan(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served, request, prompt, prompt_ids, params,
                    phase, tools_enabled, tool_dicts, image_refs=image_refs, audio_refs=audio_refs)


def fewest_dropped(attempt: Callable[[int], ChatPlan], most: int) -> ChatPlan:
    """The plan of attempt(k) for the smallest k in 0..most (messages or turns dropped, oldest first) whose prompt
    fits the context: a binary search, each try rendered and counted. When none fits, the 400 of the try with
    everything droppable dropped (most 0: the whole conversation's 400)."""
    def tried(count: int) -> ChatPlan | APIError:
        try:
            return attempt(count)
        except APIError as exc:
            if exc.code != "context_length_exceeded":
                raise
            return exc

    best = tried(0)
    low, high = 1, most if isinstance(best, APIError) else 0
    while low <= high:  # the fewest dropped that fit lie in [low, high]
        middle = (low + high) // 2
        plan = tried(middle)
        if isinstance(plan, APIError):
            low = middle + 1
        else:
            best, high = plan, middle - 1
    if isinstance(best, APIError):
        raise best
    return best


def cap_max_tokens(plan: ChatPlan) -> None:
    """max_tokens cut to the room the prompt leaves in the context, for APIs whose clients ask for more than fits
    and expect the turn to stop at the context's end (Anthropic's, Ollama's); chat's own answers a 400, as OpenAI's
    does. A prompt that fills the context alone is still refused by the engine. After attach_media (images count)."""
    room = plan.served.max_model_len - len(plan.prompt_ids)
    if room > 0 and plan.params.max_tokens is not None:
        plan.params.max_tokens = min(plan.params.max_tokens, room)


async def attach_images(plan: ChatPlan, state: ServerState) -> None:
    """Loads the plan's images and expands their placeholders in prompt_ids (usage counts image tokens)."""
    if not plan.image_refs:
        return
    served = plan.served
    if videos.wants_audio_in_video(plan.request, served):
        plan.video_tracks = []
    plan.multimodal = await image_inputs.load_images(plan.image_refs, served.image_processor, state.config,
                                                     served.video_processor, plan.video_tracks)
    plan.prompt_ids = videos.expand_video_placeholders(plan.prompt_ids, served.tokenizer, served.hf_config,
                                                       plan.multimodal.images, served.image_processor.config.merge_size)
    plan.prompt_ids = image_inputs.expand_placeholders(plan.prompt_ids, served.hf_config["image_token_id"],
                                                       plan.multimodal.images,
                                                       served.image_processor.config.merge_size)


async def attach_media(plan: ChatPlan, state: ServerState) -> None:
    """Loads the plan's images, audio clips and videos' audio tracks and expands their placeholders (every
    chat-shaped endpoint)."""
    await attach_images(plan, state)
    await audio_inputs.attach_audio(plan, state)
    await videos.attach_video_tracks(plan)


# --- engine output -> API objects -----------------------------------------------------------------------


def reasoning_token_count(plan: ChatPlan, token_ids: list[int]) -> int:
    if plan.phase is ThinkingPhase.ANSWER:
        return 0
    tok = plan.served.tokenizer
    start_id, end_id = tok.token_to_id(THINK_START), tok.token_to_id(THINK_END)
    start = 0
    if plan.phase is ThinkingPhase.MAY_THINK:
        if start_id not in token_ids:
            return 0
        start = token_ids.index(start_id)
    end = token_ids.index(end_id, start) + 1 if end_id in token_ids[start:] else len(token_ids)
    return end - start


async def turn_deltas(plan: ChatPlan, outputs: AsyncIterator[RequestOutput], tracker: RequestTracker,
                      parser: ChatOutputParser) -> AsyncIterator[tuple[RequestOutput, ParsedDelta]]:
    """Each output of a one-sample turn with its parsed delta (tool calls past plan.max_calls left out), as
    /v1/responses and /v1/messages turn them into events; the tracker follows the outputs."""
    async for out in outputs:
        tracker.on_output(out)
        comp = out.outputs[0]
        parsed = parser.feed_output(comp.delta_text, comp.finished)
        if plan.max_calls is not None:
            parsed.tool_calls = [c for c in parsed.tool_calls if c.index < plan.max_calls]
        if out.finished:
            tracker.on_finished(out)
        yield out, parsed


TurnEvents = Callable[[AsyncIterator[RequestOutput], RequestTracker], AsyncIterator[Any]]


async def answer_turn(request: Request, state: ServerState, plan: ChatPlan, arrival: float, request_id: str,
                      stream: bool, events: TurnEvents,
                      frames: Callable[[AsyncIterator[Any]], AsyncIterator[str]], body: Callable[[], dict[str, Any]],
                      frame_error: Callable[[APIError], str], media_type: str = EVENT_STREAM) -> Response:
    """One model turn of a route that shapes chat's answer its own way (/v1/messages, Ollama's /api/chat and
    /api/generate): the prompt past the guard (a blocked one gets the refusal as its answer, moderation.py), the
    engine's outputs under the guard, then `events(outputs, tracker)` streamed through `frames` (a failure after
    the 200 is `frame_error`'s last frame), or consumed and answered whole with `body()`."""
    served, retry = plan.served, state.config.retry_after_s
    engine_stream = await moderation.guarded_turn(
        moderation.guardrails_of(request), plan,
        lambda: served.engine.generate(plan.prompt_ids, plan.params, request_id=request_id, prompt=plan.prompt,
                                       **({"multimodal": plan.multimodal} if plan.multimodal else {})))
    admitted = await admit(request, [engine_stream], retry)
    if admitted is None:
        return Response(status_code=CLIENT_LEFT)
    tracker = state.metrics.track(served.name, arrival)
    outputs = admitted[0]
    moderated = moderation.moderate_outputs(plan, outputs)

    async def whole() -> Response:
        try:
            async for _ in events(moderated, tracker):
                pass
        finally:
            await close_all([moderated, outputs])
            tracker.done()
        return JSONResponse(body())

    return await reply(request, stream,
                       lambda: event_stream(frames(events(moderated, tracker)), retry, on_end=tracker.done,
                                            frame_error=frame_error, done=None),
                       whole, sources=[moderated, outputs], media_type=media_type)


def usage(plan: ChatPlan, final: RequestOutput) -> Usage:
    completion = sum(len(c.token_ids) for c in final.outputs)
    return Usage(
        prompt_tokens=len(plan.prompt_ids), completion_tokens=completion,
        total_tokens=len(plan.prompt_ids) + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=final.metrics.num_cached_tokens),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=sum(reasoning_token_count(plan, c.token_ids) for c in final.outputs)),
    )


def _logprobs(texts: TokenTexts | None, plan: ChatPlan, token_ids: list[int],
              entries: list | None) -> list[dict] | None:
    if texts is None or entries is None:
        return None
    return chat_logprobs(texts, token_ids, entries, plan.request.top_logprobs or 0)


def _token_texts(plan: ChatPlan) -> TokenTexts | None:
    return TokenTexts(plan.served.tokenizer) if plan.request.logprobs else None


def _choice(plan: ChatPlan, texts: TokenTexts | None, comp: CompletionOutput) -> ChatChoice:
    parsed = parse_chat_output(comp.text, starts_in_reasoning=plan.starts_in_reasoning, thinking=plan.phase.thinking,
                               tools_enabled=plan.tools_enabled, tool_schemas=plan.tool_schemas,
                               bound_answer=binds_answer(plan.request))
    if plan.max_calls is not None:
        parsed.tool_calls = parsed.tool_calls[: plan.max_calls]
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
             for c in parsed.tool_calls]
    content = parsed.content if parsed.content is not None or calls else ""
    message = AssistantMessage(content=content, reasoning_content=parsed.reasoning, reasoning=parsed.reasoning,
                               tool_calls=calls or None)
    lp = _logprobs(texts, plan, comp.token_ids, comp.logprobs)
    return ChatChoice(index=comp.index, message=message,
                      logprobs=ChatLogprobs(content=lp) if lp is not None else None,
                      finish_reason=finish_reason_for(parsed, comp.finish_reason or "abort"),
                      stop_reason=comp.stop_reason,
                      token_ids=list(comp.token_ids) if plan.request.return_token_ids else None)


async def complete_chat(plan: ChatPlan, outputs: AsyncIterator[RequestOutput], tracker: RequestTracker) -> Response:
    try:
        final = None
        async for out in outputs:
            tracker.on_output(out)
            final = out
        assert final is not None and final.finished
        tracker.on_finished(final)
        texts = _token_texts(plan)
        choices = [_choice(plan, texts, c) for c in final.outputs]
        if plan.audio_answer is not None:  # speak the whole answer, then attach it (content moves to the transcript)
            answer = plan.audio_answer
            for samples in await asyncio.to_thread(_speak_all, answer, final.outputs[0].token_ids):
                answer.samples.append(samples)
            message = choices[0].message
            message.audio = chat_audio.message_audio(answer, message.content or "")
            message.content = None
        body = ChatCompletionResponse(id=plan.request_id, created=plan.created, model=plan.served.name,
                                      choices=choices, usage=usage(plan, final))
        if plan.request.prompt_logprobs is not None:
            body.prompt_logprobs = prompt_logprobs_out(TokenTexts(plan.served.tokenizer), plan.prompt_ids,
                                                       final.prompt_logprobs, plan.request.prompt_logprobs)
        if plan.request.return_token_ids:
            body.prompt_token_ids = list(plan.prompt_ids)
        body = await moderation.review_answer(plan, body)
        return Response(body.model_dump_json(), media_type="application/json")
    finally:
        _ended(plan, tracker)


def _ended(plan: ChatPlan, tracker: RequestTracker) -> None:
    """However a request ends (answered, failed, the client gone): its metrics close, and its Talker state
    and KV blocks are freed at once."""
    tracker.done()
    chat_audio.close_audio(plan.audio_answer)


def _speak_all(answer: Any, token_ids: list[int]) -> list[Any]:
    return [answer.speech.feed(token_ids), answer.speech.finish()]


def _delta(parsed: ParsedDelta, call_filter: int | None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if parsed.reasoning:
        delta["reasoning_content"] = parsed.reasoning
        delta["reasoning"] = parsed.reasoning
    if parsed.content:
        delta["content"] = parsed.content
    calls: list[dict[str, Any]] = []
    for c in parsed.tool_calls:
        if call_filter is not None and c.index >= call_filter:
            continue
        if calls and calls[-1]["index"] == c.index and c.id is None:  # one entry per call and chunk, as OpenAI's
            calls[-1]["function"]["arguments"] += c.arguments
            continue
        entry: dict[str, Any] = {"index": c.index}
        if c.id is not None:
            entry["id"] = c.id
            entry["type"] = c.type or "function"
        function: dict[str, Any] = {"arguments": c.arguments}
        if c.name is not None:
            function["name"] = c.name
        entry["function"] = function
        calls.append(entry)
    if calls:
        delta["tool_calls"] = calls
    return delta


async def stream_chat(plan: ChatPlan, outputs: AsyncIterator[RequestOutput],
                      tracker: RequestTracker) -> AsyncIterator[str]:
    """The chunks of a streamed chat answer (streaming.event_stream adds the error frame and [DONE])."""
    include_usage = bool(plan.request.stream_options and plan.request.stream_options.include_usage)
    base = {"id": plan.request_id, "object": "chat.completion.chunk", "created": plan.created,
            "model": plan.served.name}
    if include_usage:
        base["usage"] = None  # every chunk but the last carries usage: null (OpenAI's rule)

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None,
              token_ids: Any = None, stop_reason: int | str | None = None, **top: Any) -> str:
        lp = {"content": logprobs} if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        if finish:
            choice["stop_reason"] = stop_reason  # vLLM's: the stop string or token id that ended the choice
        if plan.request.return_token_ids:
            choice["token_ids"] = list(token_ids or [])
        return sse({**base, **top, "choices": [choice]})

    texts = _token_texts(plan)
    n = plan.params.n
    parsers = [plan.parser() for _ in range(n)]
    made_calls = [False] * n
    done: set[int] = set()
    prompt_ids = {"prompt_token_ids": list(plan.prompt_ids)} if plan.request.return_token_ids else {}
    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""}, **prompt_ids)
    final = None
    async for out in outputs:
        tracker.on_output(out)
        final = out
        for comp in out.outputs:
            i = comp.index
            if i in done:
                continue
            parsed = parsers[i].feed_output(comp.delta_text, comp.finished)
            delta = _delta(parsed, plan.max_calls)
            answer = plan.audio_answer
            if answer is not None and (comp.delta_token_ids or comp.finished):
                # The Talker trails the text by a couple of tokens: audio for earlier tokens rides along.
                samples = await asyncio.to_thread(answer.speech.feed, list(comp.delta_token_ids))
                audio: dict[str, Any] = {"id": answer.id}
                if samples.numel():
                    answer.samples.append(samples)
                    audio["data"] = chat_audio.pcm16_b64(samples)
                if parsed.content:  # a spoken answer's text is its transcript only, as unstreamed and in OpenAI's
                    audio["transcript"] = delta.pop("content")
                if len(audio) > 1:
                    delta["audio"] = audio
            made_calls[i] = made_calls[i] or "tool_calls" in delta
            lp = _logprobs(texts, plan, comp.delta_token_ids, comp.delta_logprobs) if comp.delta_token_ids else None
            finish = None
            if comp.finished:
                done.add(i)
                finish = comp.finish_reason or "abort"
                finish = "tool_calls" if made_calls[i] and finish == "stop" else finish
            ids = comp.delta_token_ids
            if finish and answer is not None:
                if delta or lp:
                    yield chunk(i, delta, lp, None, ids)
                    ids = None
                # The rest of the speech (the Talker outlasts the text), one delta per decoded chunk.
                rest = answer.speech.finish_chunks()
                while (samples := await asyncio.to_thread(next, rest, None)) is not None:
                    answer.samples.append(samples)
                    yield chunk(i, {"audio": {"id": answer.id, "data": chat_audio.pcm16_b64(samples)}})
                # the last audio delta carries only its expiry
                delta, lp = {"audio": {"id": answer.id, "expires_at": answer.expires_at}}, None
            if delta or lp or finish or (ids and plan.request.return_token_ids):
                yield chunk(i, delta, lp, finish, ids, comp.stop_reason)
        if out.finished:
            tracker.on_finished(out)
    if (verdict := moderation.guard_chunk(plan, base)) is not None:
        yield verdict
    if include_usage and final is not None:
        yield sse({**base, "choices": [], "usage": usage(plan, final).model_dump()})


@router.post("/v1/chat/completions", responses=chat_responses(ChatCompletionResponse))
@request_body(ChatCompletionRequest)
async def create_chat_completion(request: Request) -> Response:
    arrival = time.monotonic()
    local = await local_or_forwarded(request, ChatCompletionRequest, "/chat/completions")
    if isinstance(local, Response):
        return local
    state, chat_request, served = local.state, local.body, local.served
    # Rendering and tokenizing a long conversation takes a while: off the event loop, other requests go on.
    plan = await asyncio.to_thread(plan_chat, served, chat_request, state)
    await attach_media(plan, state)
    plan.audio_answer = await asyncio.to_thread(chat_audio.start_audio, served, chat_request, plan.prompt_ids,
                                                plan.multimodal, state.config)
    blocked = await moderation.screen_prompt(request, plan)  # a blocked prompt never reaches the engine
    if blocked is not None:
        return blocked
    retry = state.config.retry_after_s
    stream = served.engine.generate(plan.prompt_ids, plan.params, request_id=plan.request_id, prompt=plan.prompt,
                                    **({"multimodal": plan.multimodal} if plan.multimodal else {}))
    admitted = await admit(request, [stream], retry)
    if admitted is None:
        chat_audio.close_audio(plan.audio_answer)
        return Response(status_code=CLIENT_LEFT)
    tracker = state.metrics.track(served.name, arrival)
    outputs = admitted[0]
    moderated = moderation.moderate_outputs(plan, outputs) if chat_request.stream else outputs
    return await reply(request, chat_request.stream,
                       lambda: event_stream(stream_chat(plan, moderated, tracker), retry,
                                            on_end=lambda: _ended(plan, tracker)),
                       lambda: complete_chat(plan, outputs, tracker), sources=[moderated, outputs])
