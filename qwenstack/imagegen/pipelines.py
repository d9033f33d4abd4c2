"""A Qwen-Image checkpoint -> a loaded diffusers pipeline and what it can do.

Decisions:
- The pipeline class comes from `_class_name` in the checkpoint's model_index.json (as diffusers itself
  decides), never from the directory name. Only the three Qwen-Image pipelines below are accepted: the
  server's request checks (how many input images, which sizes) depend on which one it is.
- Device: CUDA when present (bfloat16), else CPU (float32: bfloat16 matmuls are slow on most CPUs).
  On CUDA, `offload="auto"` compares the checkpoint's weight bytes with the free GPU memory: if they do not
  fit with room for activations, diffusers' model offload keeps only the running component on the GPU;
  if even the biggest component does not fit, sequential offload streams layer by layer.
- `auto` output sizes are what the pipelines pick themselves (the edit pipelines: about 1024x1024 with
  the last input image's aspect ratio; text-to-image: 1024x1024), resolved before the call so previews
  and the response know the size.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack.errors import ConfigError, QwenstackError
from qwenstack.resolve import served_name

log = logging.getLogger("qwenstack.imagegen")

OFFLOAD_MODES = ("auto", "none", "model", "sequential")
ACTIVATION_HEADROOM = 1.25  # weights x this must fit in free GPU memory to keep everything resident


@dataclass(frozen=True)
class PipelineKind:
    class_name: str
    task: str  # "edit" or "generate": which route serves it
    min_images: int
    max_images: int  # Qwen-Image-Edit-2509's card: 1 to 3 input images work best

    @property
    def capability(self) -> str:
        return "image_edit" if self.task == "edit" else "image_generation"


KINDS = {k.class_name: k for k in (
    PipelineKind("QwenImageEditPlusPipeline", "edit", 1, 3),
    PipelineKind("QwenImageEditPipeline", "edit", 1, 1),
    PipelineKind("QwenImagePipeline", "generate", 0, 0),
)}


@dataclass
class ImagePipeline:
    """A loaded pipeline with its name (what clients send as `model`) and kind."""

    name: str
    pipe: Any  # a diffusers DiffusionPipeline
    kind: PipelineKind
    device: str
    created: int = 0

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # latents are 2x2-patched after the VAE's downsampling

    def token_usage(self, prompt: str, images: list[Any], width: int, height: int, n: int) -> dict[str, Any]:
        """OpenAI's image `usage`: the prompt's text tokens (the text encoder's tokenizer), the condition images'
        latent patches at the size the pipeline takes each in, and the patches of the `n` images made (the
        transformer's image tokens)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        text = len(tokenizer(prompt).input_ids) if tokenizer is not None else 0
        m = self.size_multiple
        image = sum(w // m * (h // m) for w, h in (self.auto_size([picture]) for picture in images))
        made = n * (width // m) * (height // m)
        return {"input_tokens": text + image, "input_tokens_details": {"text_tokens": text, "image_tokens": image},
                "output_tokens": made, "total_tokens": text + image + made}

    def auto_size(self, images: list[Any]) -> tuple[int, int]:
        """(width, height) the pipeline would choose with no size given."""
        if self.kind.task == "generate":
            side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
            return side, side
        # The edit pipelines size the output like their reference image (the last one), at ~1024x1024 area,
        # through their module's own calculate_dimensions.
        calculate = sys.modules[type(self.pipe).__module__].calculate_dimensions
        width, height = images[-1].size
        w, h = calculate(1024 * 1024, width / height)[:2]
        m = self.size_multiple
        return w // m * m, h // m * m


def read_class_name(model_dir: Path) -> str:
    index_path = model_dir / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{model_dir} has no model_index.json: not a diffusers pipeline checkpoint") from None
    except ValueError as exc:
        raise ConfigError(f"{index_path} is not valid JSON: {exc}") from None
    name = index.get("_class_name")
    if name not in KINDS:
        raise ConfigError(f"{index_path} names the pipeline {name!r}; qwenstack serves "
                          f"{', '.join(sorted(KINDS))}")
    return name


def import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise QwenstackError("serving an image model needs diffusers, which is not installed "
                             f"({exc}): pip install 'qwenstack[image]'") from None
    return diffusers


def _weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*.safetensors"))


def choose_offload(model_dir: Path, device: str, offload: str) -> str:
    if offload not in OFFLOAD_MODES:
        raise ConfigError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if offload != "auto":
        return offload
    if not device.startswith("cuda"):
        return "none"
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    total = _weight_bytes(model_dir)
    if total * ACTIVATION_HEADROOM <= free:
        return "none"
    biggest = max((_weight_bytes(d) for d in model_dir.iterdir() if d.is_dir()), default=total)
    mode = "model" if biggest * ACTIVATION_HEADROOM <= free else "sequential"
    log.warning("the image model's weights (%.1f GiB) do not fit in free GPU memory (%.1f GiB): %s offload",
                total / 2**30, free / 2**30, mode)
    return mode


@dataclass(frozen=True)
class Placement:
    """Where a pipeline runs: its device, its weights' dtype and diffusers' offload mode."""

    device: str
    dtype: Any  # a torch.dtype
    offload: str  # none, model or sequential


def choose_placement(model_dir: Path, device: str | None = None, dtype: str | None = None,
                     offload: str = "auto") -> Placement:
    """CUDA (bfloat16) when torch sees a GPU, else CPU (float32); the offload mode from the free GPU memory."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return Placement(device, torch_dtype, choose_offload(model_dir, device, offload))


def place(pipe: Any, placement: Placement) -> None:
    """Moves a loaded pipeline to its device, or hands the moving to diffusers' offload hooks."""
    if placement.offload == "model":
        pipe.enable_model_cpu_offload(device=placement.device)
    elif placement.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=placement.device)
    else:
        pipe.to(placement.device)


def load_image_pipeline(model: str, *, name: str | None = None, device: str | None = None,
                        dtype: str | None = None, offload: str = "auto") -> ImagePipeline:
    """Loads a Qwen-Image pipeline from a local directory or a Hugging Face id."""
    import time

    from qwenstack.imagegen.compat import image_only_processor, torchvision_available
    from qwenstack.resolve import resolve_model

    diffusers = import_diffusers()
    model_dir = resolve_model(model)
    kind = KINDS[read_class_name(model_dir)]
    placement = choose_placement(model_dir, device, dtype, offload)
    extra: dict[str, Any] = {}
    if (model_dir / "processor").is_dir() and not torchvision_available():
        extra["processor"] = image_only_processor(model_dir / "processor")
    pipeline_class = getattr(diffusers, kind.class_name)
    pipe = pipeline_class.from_pretrained(model_dir, dtype=placement.dtype, **extra)
    pipe.set_progress_bar_config(disable=True)  # progress goes to our own events, not to stderr
    place(pipe, placement)
    return ImagePipeline(name or served_name(model), pipe, kind, placement.device, created=int(time.time()))
