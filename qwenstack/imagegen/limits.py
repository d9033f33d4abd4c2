"""What one image request may ask for on this server (plain data; the server checks, the CLI reuses).

Input images reuse the server's `max_image_bytes` / `max_image_pixels` (ServerConfig), so one rule covers
images sent to chat models and to the image model.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRequestLimits:
    max_n: int = 4  # images per request (each is a full pipeline run)
    max_steps: int = 100  # num_inference_steps
    max_output_pixels: int = 2048 * 2048  # width * height of an output image
    min_side: int = 16  # below one latent patch the pipelines cannot make an image
    max_partial_images: int = 3  # OpenAI's limit on partial_images
    max_true_cfg_scale: float = 20.0
    max_prompt_chars: int = 32_000
