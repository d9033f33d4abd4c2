"""OpenAI `image_url` content parts -> preprocessed images for a vision-language model's engine.

Decisions:
- Where an image may come from is the server owner's choice: `data:` URLs (base64) always; `file://` paths
  on the server's disk only with `allow_local_image_paths`; http(s) URLs are fetched by the server only with
  `allow_remote_image_urls` (off by default: a request must not make the server reach other hosts), and
  then from public addresses only (each redirect hop checked, at most 3) unless `allow_private_image_urls`.
  Every refusal is a 400 naming the message and part, so a client can tell which image was at fault; a
  remote fetch that is refused or fails says only that, whatever the reason, so it cannot map a network.
- Limits (images per request, encoded bytes, decoded pixels) are checked before the expensive work: the
  count first, the byte size before decoding (from the base64 length, the file size, the HTTP
  Content-Length or the bytes read so far), the pixel count from the image header before any pixel is
  decoded.
- The chat template sees one `<|vision_start|><|image_pad|><|vision_end|>` per image (what Qwen3-VL's own
  template renders for an image part); after tokenizing, each `<|image_pad|>` is expanded to the image's
  token count. Text that itself spells an image placeholder is refused rather than misread as an image.
- Decoding and preprocessing run in a worker thread, not on the event loop. The content hash that keys the
  encoder and prefix caches is taken over the encoded bytes plus the preprocessing settings, which determine
  the pixels exactly and are far cheaper to hash than the pixels.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from qwenstack.errors import ConfigError
from qwenstack.multimodal.image_processing import (
    ImageError, ImageLimits, ImageProcessor, ImageProcessorConfig, decode_data_url,
)
from qwenstack.multimodal.inputs import ImageInput, MultimodalInputs
from qwenstack.serving.errors import bad_request

REMOTE_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3


@dataclass
class ImageRef:
    """An image part of a request, with where it was (for error messages)."""

    message: int
    part: int
    url: str
    kind: str = "image"  # or "video" (serving/videos.py)

    @property
    def param(self) -> str:
        return f"messages.{self.message}.content.{self.part}.{self.kind}_url"

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


def image_processor_for(hf_config: dict[str, Any], model_dir: Path | None) -> ImageProcessor | None:
    """The checkpoint's image preprocessing, for a model with a vision tower (None for text models)."""
    if "vision_config" not in hf_config:
        return None
    if model_dir is None:
        raise ConfigError("a vision-language model needs its checkpoint directory for preprocessor_config.json")
    return ImageProcessor(ImageProcessorConfig.from_pretrained(model_dir))


def placeholder_text(tokenizer: Any, hf_config: dict[str, Any]) -> str:
    """`<|vision_start|><|image_pad|><|vision_end|>` as the tokenizer spells the config's token ids."""
    names = []
    for key in ("vision_start_token_id", "image_token_id", "vision_end_token_id"):
        token = tokenizer.id_to_token(hf_config[key])
        if token is None:
            raise ConfigError(f"the tokenizer has no token for {key}={hf_config[key]} of config.json")
        names.append(token)
    return "".join(names)


async def read_image_bytes(ref: ImageRef, config: Any) -> bytes:
    """The encoded image a part points to, within the server's rules and its byte limit."""
    url = ref.url.strip()
    max_bytes = config.max_image_bytes
    try:
        parsed = urlparse(url)
    except ValueError as exc:  # an unbalanced '[' or a bad IPv6 literal: urlparse refuses the URL itself
        raise ImageError(f"image_url.url is not a valid URL: {exc}") from None
    scheme = parsed.scheme.lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, max_bytes)
    if scheme == "file":
        if not config.allow_local_image_paths:
            raise ImageError("file:// image URLs are not allowed on this server (start it with "
                             "--allow-local-image-paths to read images from its disk)")
        return _read_local(Path(unquote(parsed.path)), max_bytes)
    if scheme in ("http", "https"):
        if not config.allow_remote_image_urls:
            raise ImageError("this server does not fetch remote image URLs; send the image inline as a "
                             "data:image/...;base64 URL (or start the server with --allow-remote-image-urls)")
        return await fetch_image(url, max_bytes, allow_private=config.allow_private_image_urls)
    raise ImageError("image_url.url must be a data:image/...;base64 URL"
                     + (" or a file:// path" if config.allow_local_image_paths else "")
                     + (" or an http(s) URL" if config.allow_remote_image_urls else ""))


def _read_local(path: Path, max_bytes: int) -> bytes:
    if not path.is_absolute():
        raise ImageError("file:// image URLs must name an absolute path")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError(f"{path} is not a file")
        if size > max_bytes:
            raise ImageError(f"image is {size} bytes, over the {max_bytes}-byte limit")
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path
        raise ImageError("file:// image URLs cannot hold a NUL character") from None


REFUSED = "the image URL is not allowed or could not be fetched"  # one answer for every refusal: no probing


async def fetch_image(url: str, max_bytes: int, *, allow_private: bool = False,
                      max_redirects: int = MAX_REDIRECTS) -> bytes:
    """An image over http(s). Unless `allow_private`, every hop's host must resolve to public addresses only
    (no loopback, private, link-local, ...), so a request cannot make the server reach its own network;
    redirects are followed by hand, each one checked, at most `max_redirects`. Every refusal and failure
    raises the same ImageError, so the answers reveal nothing about what is behind the server. The whole fetch
    has REMOTE_TIMEOUT_S (httpx's timeout is per read: a host sending a byte every few seconds would hold the
    request for ever)."""
    try:
        return await asyncio.wait_for(_fetch(url, max_bytes, allow_private, max_redirects), REMOTE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ImageError(REFUSED) from None


async def _fetch(url: str, max_bytes: int, allow_private: bool, max_redirects: int) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
            for _ in range(max_redirects + 1):
                if not allow_private and not await _public_host(url):
                    raise ImageError(REFUSED)
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        if urlparse(url).scheme not in ("http", "https"):
                            raise ImageError(REFUSED)
                        continue
                    if response.status_code != 200:
                        raise ImageError(REFUSED)
                    return await _read_limited(response, max_bytes)
            raise ImageError(REFUSED)  # too many redirects
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - httpx's errors, and a bad port ('notaport', 99999): InvalidURL, or an
        # OverflowError inside the connection's task group. Every failure is the same refusal (no probing).
        raise ImageError(REFUSED) from None


async def _read_limited(response: Any, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is {declared} bytes, over the {max_bytes}-byte limit")
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise ImageError(f"image is larger than the {max_bytes}-byte limit")
    return bytes(data)


async def _public_host(url: str) -> bool:
    """Whether every address the URL's host resolves to is a public (globally routable) one."""
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos}
    return bool(addresses) and all(_is_public(a) for a in addresses)


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def preprocess_image(processor: ImageProcessor, data: bytes) -> ImageInput:
    """Encoded bytes -> an ImageInput whose hash covers the bytes and the preprocessing settings."""
    pixels, grid = processor.to_patches(data)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(processor.config).encode())
    digest.update(data)
    return ImageInput(pixels, grid, digest.hexdigest())


async def load_images(refs: list[ImageRef], processor: ImageProcessor, config: Any,
                      video_processor: Any = None, audio_tracks: list | None = None) -> MultimodalInputs:
    """Reads, decodes and preprocesses a request's images (and videos' frame groups) in prompt order.
    Raises APIError 400 naming the part. audio_tracks: collects each video's audio track (serving/videos.py)."""
    videos = [r for r in refs if r.kind == "video"]
    if len(videos) > config.max_videos_per_request:
        raise bad_request(f"the request has {len(videos)} videos, more than this server's limit of "
                          f"{config.max_videos_per_request} per request", param="messages", code="too_many_videos")
    refs_images = [r for r in refs if r.kind != "video"]
    if len(refs_images) > config.max_images_per_request:
        raise bad_request(f"the request has {len(refs_images)} images, more than this server's limit of "
                          f"{config.max_images_per_request} per request", param="messages", code="too_many_images")
    limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    bounded = ImageProcessor(processor.config, limits)
    images = []
    for ref in refs:
        if ref.kind == "video":
            from qwenstack.serving.videos import load_video

            images += await load_video(ref, video_processor, config, read_image_bytes, audio_tracks)
            continue
        try:
            data = await read_image_bytes(ref, config)
            images.append(await asyncio.to_thread(preprocess_image, bounded, data))
        except ImageError as exc:
            raise bad_request(f"{ref.where}: {exc}", param=ref.param, code="invalid_image") from None
    return MultimodalInputs(images)


def expand_placeholders(prompt_ids: list[int], image_token_id: int, images: list[ImageInput],
                        merge_size: int) -> list[int]:
    """Each single `<|image_pad|>` of the rendered prompt -> as many as its image has tokens (video frame
    groups among `images` are skipped: serving/videos.py expands those)."""
    images = [im for im in images if im.video_frame is None]
    positions = [i for i, t in enumerate(prompt_ids) if t == image_token_id]
    if len(positions) != len(images):
        raise bad_request("the message text contains image placeholder tokens; send images as image_url parts",
                          param="messages", code="invalid_image")
    out: list[int] = []
    start = 0
    for position, image in zip(positions, images):
        out += prompt_ids[start:position]
        out += [image_token_id] * image.num_tokens(merge_size)
        start = position + 1
    return out + prompt_ids[start:]


__all__ = ["ImageRef", "expand_placeholders", "fetch_image", "image_processor_for", "load_images",
           "placeholder_text", "preprocess_image", "read_image_bytes"]
