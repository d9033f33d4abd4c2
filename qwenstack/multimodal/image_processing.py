"""Image preprocessing for Qwen3-VL, configured by the checkpoint's preprocessor_config.json.

Decisions:
- Reproduces transformers' Qwen2-VL image processor (the one Qwen3-VL uses) on its Pillow backend, step by
  step: convert to RGB compositing any transparency onto white, resize with Pillow (bicubic unless the
  config says otherwise) to the smart-resize size, rescale in float64 and cast to float32, normalise in
  float32, duplicate the frame temporal_patch_size times, and flatten patches in merge-block order. The
  parity test compares pixel values against transformers.
- transformers' torchvision backend (used instead when torchvision is installed) resizes with torchvision's
  antialiased bicubic; its pixels can differ from Pillow's by about one grey level.
- Images are untrusted input. The encoded size is checked before decoding and the pixel count is checked
  from the header before any pixel is decoded; only common formats are parsed; every decoding failure
  becomes an ImageError, a ValueError the server turns into a 400.
- EXIF orientation is applied when decoding bytes (as transformers' load_image does), not to PIL images
  handed in directly (as transformers' image processor does not).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from qwenstack.errors import ConfigError, RequestError

# Formats we let Pillow parse. MPO is how Pillow labels multi-picture JPEGs from phone cameras.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_ACCEPTED_FORMATS = frozenset(SUPPORTED_FORMATS) | {"MPO"}
# smart_resize refuses more extreme aspect ratios (the merged grid would be one token wide).
MAX_ASPECT_RATIO = 200
# Pillow resampling filters by their integer value in preprocessor_config.json.
_RESAMPLING = {int(r): r for r in Image.Resampling}


class ImageError(RequestError):
    """An image that cannot be used: corrupt, in an unsupported format, or over a limit."""


@dataclass(frozen=True)
class ImageLimits:
    """Guards against hostile inputs, checked before decoding pixels."""

    max_bytes: int = 20 * 1024 * 1024  # encoded file size
    max_pixels: int = 50_000_000  # width * height of the decoded image, before resizing


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of preprocessor_config.json that image preprocessing uses.

    min_pixels / max_pixels are the resize budget (transformers' size.shortest_edge / size.longest_edge,
    which are pixel counts despite their names). Serving may lower max_pixels to bound tokens per image.
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    # The transformers class defaults; Qwen3-VL's preprocessor_config.json does not set these.
    do_resize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ImageProcessorConfig":
        size = dict(config.get("size") or {})
        # Top-level min_pixels / max_pixels (Qwen2-VL era) override size, as in transformers' constructor.
        min_pixels = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        values: dict[str, Any] = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        for name in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            values[name] = config.get(name)
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ConfigError(
                "preprocessor_config.json is missing "
                + ", ".join(f"'{name}'" for name in missing)
                + " (min_pixels / max_pixels may also be given as size.shortest_edge / size.longest_edge)"
            )
        for name in ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb"):
            if config.get(name) is not None:
                values[name] = config[name]
        values["image_mean"] = _per_channel(values["image_mean"], "image_mean")
        values["image_std"] = _per_channel(values["image_std"], "image_std")
        processor = cls(**values)
        processor.validate()
        return processor

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ImageProcessorConfig":
        """preprocessor_config.json, or the image_processor of processor_config.json (transformers 5 saves it so)."""
        from qwenstack.config import read_processor_config

        return cls.from_dict(read_processor_config(model_dir, "image_processor", "preprocessor_config.json"))

    def validate(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"preprocessor_config.json: {name} must be a positive integer")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"preprocessor_config.json: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if self.resample not in _RESAMPLING:
            raise ConfigError(f"preprocessor_config.json: unknown resample filter {self.resample}")
        if any(s == 0 for s in self.image_std):
            raise ConfigError("preprocessor_config.json: image_std has a zero")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge block of patches, in pixels."""
        return self.patch_size * self.merge_size


def _per_channel(value: Any, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    if len(values) != 3:
        raise ConfigError(f"preprocessor_config.json: {name} must have 3 values (RGB), got {len(values)}")
    return values


@dataclass
class ProcessedImages:
    pixel_values: torch.Tensor  # [N_patches, C*T*P*P] float32, images concatenated in order
    grid_thw: torch.Tensor  # [num_images, 3] int64, (t, h, w) in patches
    num_image_tokens: list[int]  # placeholder tokens per image: t*h*w / merge^2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) -> the nearest size with both sides multiples of factor and area in [min, max] pixels.

    Same rule as transformers' Qwen2-VL smart_resize, including Python's round-half-to-even: a side of
    2.5 factors rounds to 2, not 3.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image aspect ratio {width}x{height} is more extreme than {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_data_url(url: str, max_bytes: int | None = None, kind: str = "image") -> bytes:
    """The bytes of a `data:image/<type>;base64,<payload>` URL (`kind="video"`: data:video/...).

    Lenient where the meaning is clear: the scheme in any case (RFC 3986), whitespace in the payload, stripped
    padding, and the URL-safe alphabet (`-_`; no payload mixes it with `+/`)."""
    if url[:5].lower() != "data:":
        raise ImageError("expected a data: URL")
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ImageError("data URL has no ',' before its payload")
    media_type, *params = (part.strip().lower() for part in header.split(";"))
    if not media_type.startswith(f"{kind}/"):
        raise ImageError(f"data URL media type is '{media_type or 'text/plain'}', expected {kind}/*")
    if "base64" not in params:
        raise ImageError(f"only base64 data URLs are supported for {kind}s")
    payload = "".join(payload.split())  # clients sometimes wrap long base64 lines
    # Reject oversized payloads before allocating the decoded copy.
    if max_bytes is not None and len(payload) // 4 * 3 - 2 > max_bytes:
        raise ImageError(f"{kind} is larger than the {max_bytes}-byte limit")
    try:
        return lenient_b64decode(payload)
    except (binascii.Error, ValueError):
        raise ImageError("data URL payload is not valid base64") from None


def lenient_b64decode(payload: str) -> bytes:
    """Base64 as clients send it (images, videos, audio): whitespace inside (wrapped lines), padding stripped,
    standard or URL-safe alphabet (strictly one or the other). binascii.Error/ValueError for anything else."""
    payload = "".join(payload.split())
    payload += "=" * (-len(payload) % 4)
    if not any(c in payload for c in "-_"):
        return base64.b64decode(payload, validate=True)
    if any(c in payload for c in "+/"):
        raise ValueError("mixed base64 alphabets")
    return base64.b64decode(payload, altchars=b"-_", validate=True)


def load_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decodes an encoded image, enforcing the limits, with EXIF orientation applied."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise ImageError(f"image has more than {limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ImageError(f"not a valid image in a supported format ({', '.join(SUPPORTED_FORMATS)})") from None
    if image.format not in _ACCEPTED_FORMATS:
        raise ImageError(f"image format {image.format} is not supported ({', '.join(SUPPORTED_FORMATS)})")
    _check_pixels(image, limits)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow raises many types for broken files (OSError, ValueError, struct.error, ...)
        raise ImageError(f"image data is corrupt or truncated: {exc}") from None
    return image


def load_image_data_url(url: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    return load_image(decode_data_url(url, limits.max_bytes), limits)


def _check_pixels(image: Image.Image, limits: ImageLimits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageError(f"image is {width}x{height}, over the {limits.max_pixels}-pixel limit")


def _to_rgb(image: Image.Image) -> Image.Image:
    # As transformers: transparency (an alpha band or a palette's transparent colour) is composited onto
    # white; a plain convert would expose whatever colour the transparent pixels happen to store.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """PIL images or encoded bytes -> pixel_values, grid_thw and placeholder counts for the vision tower."""

    def __init__(self, config: ImageProcessorConfig, limits: ImageLimits = ImageLimits()) -> None:
        self.config = config
        self.limits = limits

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.config
        if not c.do_resize:
            if height % c.factor or width % c.factor:
                raise ImageError(f"image {width}x{height} is not a multiple of {c.factor} and resizing is off")
            return height, width
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens for an image of this size, without decoding it."""
        resized_h, resized_w = self.resized_size(height, width)
        return (resized_h // self.config.patch_size) * (resized_w // self.config.patch_size) // self.config.merge_size**2

    def to_patches(self, image: Image.Image | bytes) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image -> ([h*w, C*T*P*P] float32 patches, (1, h, w) grid in patches)."""
        c = self.config
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = load_image(bytes(image), self.limits)
        _check_pixels(image, self.limits)
        try:
            if c.do_convert_rgb:
                image = _to_rgb(image)
            elif image.mode != "RGB":
                raise ImageError(f"image mode {image.mode} is not RGB and do_convert_rgb is off")
            height, width = image.height, image.width
            resized_h, resized_w = self.resized_size(height, width)
            if (resized_h, resized_w) != (height, width):
                image = image.resize((resized_w, resized_h), resample=_RESAMPLING[c.resample])
            pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        except ImageError:
            raise
        except Exception as exc:  # a lazily loaded PIL image can fail to decode only here
            raise ImageError(f"image could not be decoded: {exc}") from None

        # Same dtypes as transformers: rescale in float64 then store float32; normalise in float32.
        x = (pixels.astype(np.float64) * c.rescale_factor).astype(np.float32) if c.do_rescale else pixels.astype(np.float32)
        if c.do_normalize:
            x = (x - np.asarray(c.image_mean, dtype=np.float32)) / np.asarray(c.image_std, dtype=np.float32)
        return self._patchify(torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1))

    def _patchify(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        # image: [C, H, W] -> [gh*gw, C*T*P*P], patches in merge-block order, each patch laid out [C, T, P, P]
        # to match the Conv3d weight [D, C, T, P, P] of the patch embedding.
        c = self.config
        p, m, t = c.patch_size, c.merge_size, c.temporal_patch_size
        channels, height, width = image.shape
        gh, gw = height // p, width // p
        blocks = image.reshape(channels, gh // m, m, p, gw // m, m, p)
        blocks = blocks.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        # A still image is its own video of T identical frames.
        frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], t, p, p)  # [gh/m, gw/m, m, m, C, T, P, P]
        return frames.reshape(gh * gw, channels * t * p * p), (1, gh, gw)

    def __call__(self, images: Sequence[Image.Image | bytes]) -> ProcessedImages:
        if not images:
            raise ImageError("no images to process")
        patches, grids = [], []
        for image in images:
            image_patches, grid = self.to_patches(image)
            patches.append(image_patches)
            grids.append(grid)
        merge_unit = self.config.merge_size**2
        return ProcessedImages(
            pixel_values=torch.cat(patches, dim=0),
            grid_thw=torch.tensor(grids, dtype=torch.int64),
            num_image_tokens=[t * h * w // merge_unit for t, h, w in grids],
        )


__all__ = [
    "ImageError",
    "ImageLimits",
    "ImageProcessor",
    "ImageProcessorConfig",
    "ProcessedImages",
    "decode_data_url",
    "load_image",
    "load_image_data_url",
    "smart_resize",
]
