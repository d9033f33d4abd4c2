"""Images through the OpenAI-compatible server, driven by the official `openai` SDK against a tiny random
Qwen3-VL: base64 images in chat (streamed or not) give exactly what the engine gives for the same
preprocessed image, image tokens are counted in usage, the prefix cache and the encoder cache serve a
repeated image, and every refusal is a 400 naming the part (corrupt, oversized, too many, unsupported
format, remote or local URLs not allowed, a corrupt video, an image for a text-only model)."""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import torch
from PIL import Image

from server_utils import BackgroundServer, tiny_served_model
from vl_checkpoints import IMAGE_TOKEN_ID, build_vl_checkpoint, data_url, noise_image, png_bytes
from qwenstack.engine.engine import EngineConfig
from qwenstack.engine.params import SamplingParams
from qwenstack.models.registry import load_model
from qwenstack.multimodal.image_processing import ImageError
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.images import ImageRef, read_image_bytes
from qwenstack.serving.served import build_served_model
from qwenstack.tokenizer import Tokenizer


MAX_IMAGES, MAX_BYTES, MAX_PIXELS = 2, 150_000, 600 * 600
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
IMAGE_A, IMAGE_B = noise_image(70, 50, seed=1), noise_image(90, 120, seed=2)  # 4 and 12 image tokens


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vl_checkpoint(tmp_path_factory.mktemp("vl-served"), "dense", tie=False, seed=5, with_tokenizer=True)


@pytest.fixture(scope="module")
def server(vl_path: Path, tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    import json

    vl = build_served_model("vl", load_model(vl_path, dtype=torch.float32), Tokenizer.from_dir(vl_path),
                            EngineConfig(block_size=4, kv_cache_memory=2**23),
                            hf_config=json.loads((vl_path / "config.json").read_text()), model_dir=vl_path)
    config = ServerConfig(ui_db_path=":memory:", enable_ui=False, max_images_per_request=MAX_IMAGES,
                          max_image_bytes=MAX_BYTES, max_image_pixels=MAX_PIXELS)
    app = create_app([vl, tiny_served_model(tiny_qwen3)], config)
    with BackgroundServer(app) as srv:
        srv.vl = vl  # type: ignore[attr-defined]
        yield srv


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(client: openai.OpenAI, content: list[dict[str, Any]], model: str = "vl", **kwargs: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=8, extra_body=NO_THINK, **kwargs)


def direct_answer(server: BackgroundServer, text_before: str, images: list[Image.Image], text_after: str) -> tuple[str, int]:
    """What the engine says for the same conversation built by hand: the reference for the server path."""
    vl = server.vl  # type: ignore[attr-defined]
    tok = vl.tokenizer
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    content = text_before + placeholder * len(images) + text_after
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                     enable_thinking=False)
    ids = tok.encode(prompt)
    processed = vl.image_processor([png_bytes(im) for im in images])
    expanded: list[int] = []
    counts = iter(processed.num_image_tokens)
    for t in ids:
        expanded += [IMAGE_TOKEN_ID] * next(counts) if t == IMAGE_TOKEN_ID else [t]
    from qwenstack.multimodal.inputs import MultimodalInputs, images_from_processed

    async def go() -> Any:
        final = None
        async for out in vl.engine.generate(expanded, SamplingParams(temperature=0, max_tokens=8),
                                            multimodal=MultimodalInputs(images_from_processed(processed))):
            final = out
        return final

    final = asyncio.run(go())
    return final.outputs[0].text, len(expanded)


def test_models_list_vision_capability(client: openai.OpenAI) -> None:
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards["vl"]["capabilities"] == ["chat", "completion", "vision"]
    assert "vision" not in cards["tiny"]["capabilities"]


def test_base64_images_answer_as_the_engine_does(server: BackgroundServer, client: openai.OpenAI) -> None:
    content = [{"type": "text", "text": "Compare "}, image_part(data_url(IMAGE_A)), image_part(data_url(IMAGE_B)),
               {"type": "text", "text": " please."}]
    r = ask(client, content)
    want_text, want_prompt_tokens = direct_answer(server, "Compare ", [IMAGE_A, IMAGE_B], " please.")
    assert r.usage.prompt_tokens == want_prompt_tokens  # 4 + 12 image tokens counted
    message = r.choices[0].message
    assert message.content == want_text and want_text.count("<|unused_") == 8  # 8 generated tokens
    streamed = ask(client, content, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want_text
    again = ask(client, content)
    assert again.choices[0].message.content == message.content
    # vLLM's spelling of the part, the URL as a plain string (and `detail`, accepted): the same answer
    plain = [content[0], {"type": "image_url", "image_url": data_url(IMAGE_A)},
             {"type": "image_url", "image_url": {"url": data_url(IMAGE_B), "detail": "low"}}, content[3]]
    assert ask(client, plain).choices[0].message.content == message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 8  # blocks holding the images came from the cache
    # Same prompt tokens, other pixels: another answer, and the cache shares only what precedes the images.
    swapped = ask(client, [content[0], image_part(data_url(noise_image(70, 50, seed=9))), content[2], content[3]])
    assert swapped.usage.prompt_tokens == r.usage.prompt_tokens
    assert swapped.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens


def test_repeated_image_is_encoded_once(server: BackgroundServer, client: openai.OpenAI) -> None:
    stats = server.vl.engine.engine.runner.multimodal.cache.stats  # type: ignore[attr-defined]
    image = noise_image(64, 64, seed=21)
    ask(client, [{"type": "text", "text": "What is this?"}, image_part(data_url(image))])
    misses = stats.misses
    # The next turn of the conversation sends the same image again, at a different place in the prompt.
    client.chat.completions.create(model="vl", temperature=0, max_tokens=4, extra_body=NO_THINK, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(data_url(image))]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, image_part(data_url(image))]},
    ])
    assert stats.misses == misses


def expect_400(client: openai.OpenAI, content: list[dict[str, Any]], match: str, model: str = "vl") -> dict:
    with pytest.raises(openai.BadRequestError, match=match) as info:
        ask(client, content, model=model)
    return info.value.body  # type: ignore[return-value]


def test_error_cases(client: openai.OpenAI, tmp_path: Path) -> None:
    text = {"type": "text", "text": "Describe"}
    corrupt = "data:image/png;base64," + base64.b64encode(png_bytes(IMAGE_A)[:60]).decode()
    body = expect_400(client, [text, image_part(corrupt)], r"messages\[0\]\.content\[1\]: .*corrupt|supported format")
    assert body["param"] == "messages.0.content.1.image_url" and body["code"] == "invalid_image"
    expect_400(client, [text, image_part("data:image/png;base64,@@@")], "not valid base64")
    expect_400(client, [text, image_part("data:text/plain;base64,aGk=")], "expected image/")
    expect_400(client, [image_part(data_url(IMAGE_A))] * (MAX_IMAGES + 1), "3 images, more than .* limit of 2")
    big = Image.frombytes("RGB", (300, 300), torch.randint(0, 256, (300 * 300 * 3,), dtype=torch.uint8).numpy().tobytes())
    expect_400(client, [image_part(data_url(big))], "byte limit")
    expect_400(client, [image_part(data_url(Image.new("RGB", (700, 600), "white")))], "pixel limit")
    tiff = io.BytesIO()
    IMAGE_A.save(tiff, format="TIFF")
    expect_400(client, [image_part("data:image/tiff;base64," + base64.b64encode(tiff.getvalue()).decode())],
               "supported format")
    expect_400(client, [image_part("https://example.com/cat.png")], "does not fetch remote image URLs")
    local = tmp_path / "a.png"
    local.write_bytes(png_bytes(IMAGE_A))
    expect_400(client, [image_part(local.as_uri())], "file:// image URLs are not allowed")
    expect_400(client, [image_part(str(local))], "must be a data:image")
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    expect_400(client, [text, video], "video could not be decoded")  # video itself: test_qwen3_vl_video.py
    # A placeholder typed in the text stays text (special tokens in content are plain text by default), so
    # it cannot pose as an image; with --special-tokens-in-content, expand_placeholders refuses it instead.
    typed = ask(client, [{"type": "text", "text": "<|image_pad|>"}, image_part(data_url(IMAGE_A))])
    plain = ask(client, [{"type": "text", "text": "x"}, image_part(data_url(IMAGE_A))])
    assert typed.usage.prompt_tokens > plain.usage.prompt_tokens
    expect_400(client, [text, image_part(data_url(IMAGE_A))], r"does not accept image_url input \(it is text-only\)",
               model="tiny")
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    expect_400(client, [text, audio], r"does not accept input_audio input \(it takes text and image_url, video_url\)")
    r = ask(client, [{"type": "text", "text": "still fine"}])  # the server keeps serving
    assert r.choices[0].finish_reason in ("stop", "length")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def test_local_and_remote_urls_when_the_server_allows_them(tmp_path: Path) -> None:
    data = png_bytes(IMAGE_A)
    (tmp_path / "a.png").write_bytes(data)
    allow = ServerConfig(allow_local_image_paths=True, allow_remote_image_urls=True, allow_private_image_urls=True,
                         max_image_bytes=MAX_BYTES)
    ref = ImageRef(0, 0, (tmp_path / "a.png").as_uri())
    assert asyncio.run(read_image_bytes(ref, allow)) == data
    handler = lambda *a, **k: _Quiet(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
        assert asyncio.run(read_image_bytes(ImageRef(0, 0, url), allow)) == data
        with pytest.raises(ImageError, match="not allowed or could not be fetched"):
            asyncio.run(read_image_bytes(ImageRef(0, 0, url + "x"), allow))
        small = ServerConfig(allow_remote_image_urls=True, allow_private_image_urls=True, max_image_bytes=100)
        with pytest.raises(ImageError, match="byte limit"):
            asyncio.run(read_image_bytes(ImageRef(0, 0, url), small))
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(ImageError, match="not allowed"):
        asyncio.run(read_image_bytes(ref, ServerConfig()))


def test_chat_template_from_processor_file(vl_path: Path, tmp_path: Path) -> None:
    """Qwen3-VL checkpoints may keep the chat template in chat_template.json (the processor's file)."""
    import json

    (tmp_path / "tokenizer.json").write_bytes((vl_path / "tokenizer.json").read_bytes())
    config = json.loads((vl_path / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert Tokenizer.from_dir(tmp_path).chat_template == template


def test_input_image_through_the_responses_api(client: openai.OpenAI) -> None:
    """/v1/responses: an input_image part reaches the model as the same image part of chat does."""
    text = {"type": "input_text", "text": "What is in the picture?"}
    image = {"type": "input_image", "image_url": data_url(IMAGE_A)}
    args = dict(model="vl", temperature=0, max_output_tokens=8, reasoning={"effort": "none"})
    seen = client.responses.create(input=[{"role": "user", "content": [text, image]}], **args)
    blind = client.responses.create(input=[{"role": "user", "content": [text]}], **args)
    assert seen.output[-1].type == "message"
    # <|vision_start|>, the image's 4 tokens, <|vision_end|>: the picture is in the prompt.
    assert seen.usage.input_tokens == blind.usage.input_tokens + 4 + 2
    chat = ask(client, [{"type": "text", "text": text["text"]}, image_part(image["image_url"])])
    assert seen.output_text == chat.choices[0].message.content and seen.usage.input_tokens == chat.usage.prompt_tokens


# Qwen2-VL's chat template (Qwen2.5-VL's and Qwen3-VL's number pictures the same way under add_vision_id).
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("add_vision_id", [True, False])
def test_add_vision_id_numbers_pictures_as_the_template_does(server: BackgroundServer, add_vision_id: bool) -> None:
    """chat_template_kwargs.add_vision_id: the server hands the template text, not parts, so the template could
    not write its "Picture N: " labels (they were silently missing); the prompt must be the template's own
    rendering of the parts, numbered over the whole conversation."""
    import httpx

    from qwenstack.chat_template import render_chat

    url = data_url(IMAGE_A)
    turns = [[{"type": "text", "text": "Compare "}, image_part(url), image_part(url)], "Two pictures.",
             [image_part(url), {"type": "text", "text": "and this?"}]]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(turns)]
    kwargs = {"chat_template": QWEN_VL_TEMPLATE, "add_vision_id": add_vision_id}
    r = httpx.post(server.url + "/tokenize", json={"model": "vl", "messages": messages, "chat_template_kwargs": kwargs})
    tok = server.vl.tokenizer  # type: ignore[attr-defined]
    parts = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
              [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]
    want = render_chat(QWEN_VL_TEMPLATE, parts, add_generation_prompt=True, special_tokens=tok.special_tokens,
                       add_vision_id=add_vision_id)
    assert ("Picture 3: " in want) == add_vision_id
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(want)


def test_text_parts_concatenate_as_the_vl_template_renders_them(server: BackgroundServer) -> None:
    """A VL model's template concatenates a message's text parts ("a" + "b"), images or not, and vLLM renders
    them so for such models; they were joined by a newline (what vLLM does for a text model's string template)."""
    import httpx

    from qwenstack.chat_template import render_chat

    parts = [{"type": "text", "text": "Describe"}, {"type": "text", "text": " the sky."}]
    messages = [{"role": "user", "content": parts}]
    r = httpx.post(server.url + "/tokenize", json={"model": "vl", "messages": messages,
                                                   "chat_template_kwargs": {"chat_template": QWEN_VL_TEMPLATE}})
    tok = server.vl.tokenizer  # type: ignore[attr-defined]
    want = render_chat(QWEN_VL_TEMPLATE, messages, add_generation_prompt=True, special_tokens=tok.special_tokens)
    assert "Describe the sky." in want
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(want)
