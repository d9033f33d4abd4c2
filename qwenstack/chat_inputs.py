"""LLM.chat's messages with media parts -> prompt token ids and preprocessed inputs, through the server's code.

    prompt_ids, multimodal = render_media_chat(view, messages, tools=None, enable_thinking=True)

Decisions:
- The same content-part shapes as the server's chat endpoint (`{"type": "image_url", "image_url": {"url":
  ...}}` with a data: URL, or a file:// URL / plain local path; `video_url` parts alike), validated by the server's pydantic models and
  rendered by its `template_messages`, then loaded by its image loader: one behaviour, not two copies.
- Local files are allowed (the caller owns the process); remote URLs are not fetched. The server's size and
  count limits apply, so a mistake fails with the same message the server would give, as a RequestError.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack.errors import RequestError
from qwenstack.multimodal.inputs import MultimodalInputs
from qwenstack.tokenizer import Tokenizer

MEDIA_PART_TYPES = {"image_url", "video_url", "input_audio", "audio_url"}


@dataclass
class ChatModelView:
    """What rendering a chat with media needs to know about a model (a ServedModel without an engine)."""

    name: str
    tokenizer: Tokenizer
    hf_config: dict[str, Any]
    model_dir: Path


def _run(coroutine: Any) -> Any:
    """asyncio.run, also from inside a running loop (a notebook): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def has_media(conversation: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") in MEDIA_PART_TYPES for p in m["content"]) for m in conversation)


def _local_urls(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain paths in image_url and video_url parts -> file:// URLs (what the server's loader reads)."""
    out = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                key = part.get("type") if isinstance(part, dict) else None
                url = part.get(key, {}).get("url") if key in ("image_url", "video_url") else None
                if isinstance(url, str) and ":" not in url.split("/", 1)[0] and Path(url).expanduser().is_file():
                    part = {**part, key: {**part[key], "url": Path(url).expanduser().resolve().as_uri()}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def render_media_chat(view: ChatModelView, conversation: list[dict[str, Any]], *,
                      tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                      **template_kwargs: Any) -> tuple[str, list[int], MultimodalInputs | None]:
    """(rendered prompt, prompt ids with each image's placeholder expanded, the preprocessed images)."""
    from pydantic import ValidationError

    from qwenstack.serving import images as image_inputs
    from qwenstack.serving.chat import VisionIds, template_messages
    from qwenstack.serving.config import ServerConfig
    from qwenstack.serving.errors import APIError
    from qwenstack.serving.protocol import ChatMessage
    from qwenstack.serving.served import ServedModel
    from qwenstack.serving.videos import expand_video_placeholders, video_processor_for

    processor = image_inputs.image_processor_for(view.hf_config, view.model_dir)
    served = ServedModel(view.name, None, view.tokenizer, 0, view.hf_config,  # type: ignore[arg-type]
                         image_processor=processor, video_processor=video_processor_for(view.hf_config, view.model_dir))
    config = ServerConfig(allow_local_image_paths=True)
    try:
        messages = [ChatMessage.model_validate(m) for m in _local_urls(conversation)]
        refs: list[image_inputs.ImageRef] = []
        vision_ids = VisionIds.for_render(template_kwargs.get("chat_template") or view.tokenizer.chat_template,
                                          template_kwargs)
        prompt = view.tokenizer.apply_chat_template(template_messages(messages, served, refs, vision_ids=vision_ids),
                                                    tools=tools, add_generation_prompt=add_generation_prompt,
                                                    **template_kwargs)
        prompt_ids = view.tokenizer.encode(prompt)
        if not refs:
            return prompt, prompt_ids, None
        multimodal = _run(image_inputs.load_images(refs, processor, config, served.video_processor))
        prompt_ids = expand_video_placeholders(prompt_ids, view.tokenizer, view.hf_config, multimodal.images,
                                               processor.config.merge_size)
        prompt_ids = image_inputs.expand_placeholders(prompt_ids, view.hf_config["image_token_id"],
                                                      multimodal.images, processor.config.merge_size)
    except APIError as exc:
        raise RequestError(exc.message) from None
    except ValidationError as exc:
        raise RequestError(f"invalid chat message: {exc.errors()[0].get('msg')}") from None
    return prompt, prompt_ids, multimodal
