"""One image request (`ImageJob`) and how it runs (`run_job`), independent of HTTP.

Decisions:
- `n` images are `n` pipeline calls with seeds `seed, seed+1, ...`: Qwen-Image-Edit-2509 only batches one
  prompt at a time anyway, every image is reproducible on its own, and progress and cancellation see every
  step. Noise is drawn from a CPU generator, so a seed gives the same image on CPU and GPU builds alike.
- Progress is reported after every denoising step through diffusers' `callback_on_step_end`, which is
  also where cancellation is checked: a cancelled job stops within one step (`JobCancelled` unwinds the
  pipeline call) instead of finishing its remaining steps.
- Previews (`partial_images` per image, as OpenAI's field) decode the current latents with the VAE at
  evenly spaced steps; they cost one VAE decode each, so none are made unless asked for.
- A mask (OpenAI's: transparent where the image may change) is applied by compositing: Qwen-Image-Edit
  has no inpainting input, so the edited image is pasted over the first input image through the mask,
  which keeps everything outside the mask exactly as it was.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from PIL import Image

from qwenstack.imagegen.pipelines import ImagePipeline

OUTPUT_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
PNG_COMPRESS_LEVEL = 1  # the server's time per job counts more than ~10% of response bytes


@dataclass
class ImageJob:
    prompt: str
    width: int
    height: int
    images: list[Image.Image] = field(default_factory=list)  # RGB condition images (edits)
    n: int = 1
    seed: int = 0
    num_inference_steps: int = 40  # the Qwen-Image-Edit cards use 40 steps
    true_cfg_scale: float = 4.0  # ... with true CFG 4 against a blank negative prompt
    negative_prompt: str | None = " "
    partial_images: int = 0  # previews per image
    mask: Image.Image | None = None  # RGBA, the size of images[0]
    output_format: str = "png"
    output_compression: int | None = None  # 0-100, webp and jpeg

    @property
    def total_steps(self) -> int:
        return self.n * self.num_inference_steps


@dataclass
class Progress:
    image_index: int
    step: int  # steps done for this image, 1..num_inference_steps
    steps_done: int  # over the whole job
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.steps_done / self.total_steps


@dataclass
class PartialImage:
    image_index: int
    partial_index: int  # 0.. over the whole job
    data: bytes  # encoded in the job's output format


@dataclass
class FinishedImage:
    image_index: int
    data: bytes
    seed: int


JobEvent = Union[Progress, PartialImage, FinishedImage]


class JobCancelled(Exception):
    """The client went away: raised from the step callback to stop the pipeline between steps."""


def pipeline_kwargs(pipeline: ImagePipeline, job: ImageJob, index: int) -> dict[str, Any]:
    """The diffusers call that makes image `index` of `job` (without the step callback)."""
    import torch

    kwargs: dict[str, Any] = dict(
        prompt=job.prompt, negative_prompt=job.negative_prompt, true_cfg_scale=job.true_cfg_scale,
        height=job.height, width=job.width, num_inference_steps=job.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(job.seed + index), output_type="pil")
    if pipeline.kind.max_images > 1:
        kwargs["image"] = list(job.images)
    elif pipeline.kind.max_images == 1:
        kwargs["image"] = job.images[0]
    return kwargs


def preview_steps(num_steps: int, previews: int) -> set[int]:
    """0-based steps after which a preview is decoded: evenly spaced, never the last step (the final
    image follows it anyway)."""
    if previews <= 0 or num_steps < 2:
        return set()
    return {min(num_steps - 2, (num_steps * (k + 1)) // (previews + 1) - 1) for k in range(previews)} - {-1}


def decode_latents(pipeline: ImagePipeline, latents: Any, width: int, height: int) -> Image.Image:
    """Packed latents in the middle of denoising -> an image, the way the pipelines decode their last."""
    import torch

    pipe = pipeline.pipe
    vae = pipe.vae
    with torch.inference_mode():
        x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        pixels = vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def apply_mask(edited: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Edited pixels where the mask is transparent, the original's elsewhere (both at the output size)."""
    size = edited.size
    alpha = mask.convert("RGBA").getchannel("A").resize(size, Image.Resampling.NEAREST)
    editable = alpha.point(lambda a: 255 if a == 0 else 0)
    return Image.composite(edited, original.convert("RGB").resize(size, Image.Resampling.LANCZOS), editable)


def encode_image(image: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if output_format in ("webp", "jpeg"):
        options["quality"] = 95 if compression is None else compression
    else:  # zlib level 1: a 1024x1024 image encodes in ~2/3 of the default level 6's time, ~10% larger
        options["compress_level"] = PNG_COMPRESS_LEVEL
    image.convert("RGB").save(buffer, OUTPUT_FORMATS[output_format], **options)
    return buffer.getvalue()


def run_job(pipeline: ImagePipeline, job: ImageJob, emit: Callable[[JobEvent], None],
            cancelled: Callable[[], bool] = lambda: False, between_steps: Callable[[], None] = lambda: None) -> None:
    """Runs every pipeline call of `job`, emitting Progress after each step, PartialImage previews and a
    FinishedImage per image. Raises JobCancelled between steps once `cancelled()` is true; calls
    `between_steps` after each step (the queue uses it to let chat requests go first)."""
    previews = preview_steps(job.num_inference_steps, job.partial_images)
    partial_count = 0
    for index in range(job.n):
        if cancelled():
            raise JobCancelled()

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any], index: int = index) -> dict:
            nonlocal partial_count
            if cancelled():
                raise JobCancelled()
            if step in previews:
                preview = decode_latents(pipeline, tensors["latents"], job.width, job.height)
                emit(PartialImage(index, partial_count, encode_image(preview, job.output_format,
                                                                     job.output_compression)))
                partial_count += 1
            emit(Progress(index, step + 1, index * job.num_inference_steps + step + 1, job.total_steps))
            between_steps()
            return {}

        image = pipeline.pipe(**pipeline_kwargs(pipeline, job, index), callback_on_step_end=on_step_end).images[0]
        if job.mask is not None:
            image = apply_mask(image, job.images[0], job.mask)
        emit(FinishedImage(index, encode_image(image, job.output_format, job.output_compression), job.seed + index))
