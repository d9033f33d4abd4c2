"""What one image request may ask for on this server (plain data; the server checks, the CLI reuses).

Input images reuse the server's `max_image_bytes` / `max_image_pixels` (ServerConfig), so one rule covers
images sent to chat models and to the image model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SIZE_RE = re.compile(r"^(\d{1,9})x(\d{1,9})$")  # any size a client means; the limits below judge it


@dataclass(frozen=True)
class ImageRequestLimits:
    max_n: int = 4  # images per request (each is a full pipeline run)
    max_steps: int = 100  # num_inference_steps
    max_output_pixels: int = 2048 * 2048  # width * height of an output image
    min_side: int = 16  # below one latent patch the pipelines cannot make an image
    max_partial_images: int = 3  # OpenAI's limit on partial_images
    max_true_cfg_scale: float = 20.0
    max_prompt_chars: int = 32_000


def parse_size(size: str, multiple: int, limits: ImageRequestLimits) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height), checked against what the pipeline can make and the pixel limit.
    Raises ValueError naming the limit."""
    match = SIZE_RE.match(size)
    if not match:
        raise ValueError(f"size must be 'auto' or WIDTHxHEIGHT (e.g. 1024x1024), got {size!r}")
    width, height = int(match[1]), int(match[2])
    if width % multiple or height % multiple:
        raise ValueError(f"size {size}: this model makes images whose sides are multiples of {multiple} pixels")
    if min(width, height) < limits.min_side:
        raise ValueError(f"size {size}: each side must be at least {limits.min_side} pixels")
    if width * height > limits.max_output_pixels:
        raise ValueError(f"size {size} is {width * height} pixels, over this server's limit of "
                         f"{limits.max_output_pixels} pixels per image")
    return width, height
