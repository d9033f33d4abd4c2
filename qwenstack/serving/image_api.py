"""`POST /v1/images/edits` (multipart) and `POST /v1/images/generations` (JSON), in OpenAI's shape, served by
a Qwen-Image diffusers pipeline (qwenstack.imagegen) beside the chat models.

Decisions:
- The request fields are OpenAI's (`image[]`, `prompt`, `mask`, `n`, `size`, `response_format`,
  `output_format`, `output_compression`, `stream`, `partial_images`) plus vLLM-Omni's diffusion extensions
  (`negative_prompt`, `num_inference_steps`, `true_cfg_scale`, `seed`). Fields OpenAI defines for its own
  models (`quality`, `background`, `input_fidelity`, `user`) are accepted and ignored. Images come back
  inline only (`b64_json`); `url` is refused, since this server keeps no files.
- Every check happens before the job is queued and answers 400 naming the limit: how many images the
  pipeline takes, bytes and pixels per image (the server's image limits), the size (a multiple of the
  pipeline's 16-pixel latent patch, within the pixel limit), the mask's size, n, steps, partial_images.
- `stream=true` sends `image_edit.progress` events (our addition: `progress` from 0 to 1 after every
  denoising step), `image_edit.partial_image` previews and one `image_edit.completed` per image
  (`image_generation.*` for generations), then `data: [DONE]`. A queue-full refusal is a 429 with
  Retry-After before the stream starts; a failure inside the stream is an error frame.
- A client that goes away cancels its job: streaming through the closed generator, non-streaming by
  polling for the disconnect while it waits.
- Without a seed, one is drawn and returned with each image (`seed`), so any image can be made again.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from qwenstack.imagegen.jobs import FinishedImage, ImageJob, JobCancelled, PartialImage, Progress
from qwenstack.imagegen.limits import ImageRequestLimits, parse_size
from qwenstack.imagegen.pipelines import ImagePipeline
from qwenstack.imagegen.queue import ImageJobQueue, JobHandle, QueueFull
from qwenstack.multimodal.image_processing import ImageError, ImageLimits, _to_rgb, load_image
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.errors import APIError, bad_request, error_frame, from_exception, queue_full
from qwenstack.serving.protocol import null_means_default
from qwenstack.serving.state import parse
from qwenstack.serving.streaming import DONE, ClientDisconnected, ClosingStreamingResponse, sse, unless_disconnected

log = logging.getLogger("qwenstack.server")

MAX_SEED = 2**63 - 1
OutputFormat = Literal["png", "webp", "jpeg"]


class ImageOptions(BaseModel):
    """The fields /v1/images/edits and /v1/images/generations share (the JSON body of generations)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI's fields for its own models (quality, style, ...)
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool = False
    partial_images: int = Field(0, ge=0)
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, ge=1)
    true_cfg_scale: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return null_means_default(cls, data)  # as for chat (serving/protocol.py)


@dataclass
class ImageService:
    """The image model of one app: its pipeline (loaded in the background), its job queue and limits."""

    config: ServerConfig
    limits: ImageRequestLimits
    chat_busy: Callable[[], bool] | None = None  # whether a chat engine has requests (image jobs yield)
    queue: ImageJobQueue | None = None
    loading: bool = False
    failed: str | None = None

    @property
    def pipeline(self) -> ImagePipeline | None:
        return self.queue.pipeline if self.queue else None

    def serve(self, pipeline: ImagePipeline) -> None:
        self.queue = ImageJobQueue(pipeline, max_queued=self.config.image_max_queued, nice=self.config.image_nice,
                                   chat_busy=self.chat_busy, yield_s=self.config.image_yield_s)

    def start(self, on_load_error: Callable[[BaseException], None] | None = None) -> None:
        """Loads `config.image_model` in a thread (requests get 503 until it is ready)."""
        if self.queue is not None or not self.config.image_model:
            return
        self.loading = True

        def load() -> None:
            from qwenstack.imagegen.pipelines import load_image_pipeline

            try:
                self.serve(load_image_pipeline(self.config.image_model, name=self.config.image_model_name,
                                               device=self.config.image_device, offload=self.config.image_offload))
                log.info("image model %s ready on %s", self.pipeline.name, self.pipeline.device)
            except BaseException as exc:  # noqa: BLE001 - reported; the server decides whether to exit
                self.failed = f"loading the image model {self.config.image_model} failed: {exc}"
                log.error(self.failed)
                if on_load_error is not None:
                    on_load_error(exc)
            finally:
                self.loading = False

        threading.Thread(target=load, name="qwenstack-image-loader", daemon=True).start()

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    def model_cards(self) -> list[dict[str, Any]]:
        p = self.pipeline
        if p is None:
            return []
        return [{"id": p.name, "object": "model", "created": p.created, "owned_by": "qwenstack",
                 "capabilities": [p.kind.capability]}]

    def ready_pipeline(self, task: str, model: str | None) -> ImagePipeline:
        if self.queue is None:
            if self.loading:
                raise APIError(503, f"loading the image model {self.config.image_model}", code="loading",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            raise APIError(404, self.failed or "this server has no image model (start it with --image-model)",
                           param="model", code="model_not_found")
        pipeline = self.queue.pipeline
        if model and model != pipeline.name:
            raise APIError(404, f"the image model '{model}' is not served here; this server's image model is "
                           f"'{pipeline.name}'", param="model", code="model_not_found")
        if pipeline.kind.task != task:
            route = "/v1/images/edits" if pipeline.kind.task == "edit" else "/v1/images/generations"
            what = "edits images" if pipeline.kind.task == "edit" else "makes images from text alone"
            raise bad_request(f"the image model '{pipeline.name}' ({pipeline.kind.class_name}) {what}: "
                              f"use {route}", param="model", code="unsupported_task")
        return pipeline


def get_service(request: Request) -> ImageService:
    return request.app.state.qwenstack_images


# ------------------------------------------------------------------------------------------ checks


def _parse_size(size: str, pipeline: ImagePipeline, images: list[Any], limits: ImageRequestLimits) -> tuple[int, int]:
    if size == "auto":
        return pipeline.auto_size(images)
    try:
        return parse_size(size, pipeline.size_multiple, limits)
    except ValueError as exc:
        raise bad_request(str(exc), param="size", code="invalid_size") from None


def build_job(options: ImageOptions, pipeline: ImagePipeline, images: list[Any], mask: Any,
              limits: ImageRequestLimits) -> ImageJob:
    if options.response_format != "b64_json":
        raise bad_request("this server returns images inline: response_format must be b64_json",
                          param="response_format")
    if len(options.prompt) > limits.max_prompt_chars:
        raise bad_request(f"the prompt has {len(options.prompt)} characters, over the limit of "
                          f"{limits.max_prompt_chars}", param="prompt")
    if options.n > limits.max_n:
        raise bad_request(f"n={options.n} is over this server's limit of {limits.max_n} images per request",
                          param="n")
    if options.partial_images > limits.max_partial_images:
        raise bad_request(f"partial_images={options.partial_images} is over the limit of "
                          f"{limits.max_partial_images}", param="partial_images")
    steps = options.num_inference_steps or ImageJob.num_inference_steps
    if steps > limits.max_steps:
        raise bad_request(f"num_inference_steps={steps} is over this server's limit of {limits.max_steps}",
                          param="num_inference_steps")
    cfg = ImageJob.true_cfg_scale if options.true_cfg_scale is None else options.true_cfg_scale
    if cfg > limits.max_true_cfg_scale:
        raise bad_request(f"true_cfg_scale={cfg} is over the limit of {limits.max_true_cfg_scale}",
                          param="true_cfg_scale")
    width, height = _parse_size(options.size, pipeline, images, limits)
    if mask is not None and mask.size != images[0].size:
        raise bad_request(f"the mask is {mask.size[0]}x{mask.size[1]} but the first image is "
                          f"{images[0].size[0]}x{images[0].size[1]}; they must be the same size",
                          param="mask", code="invalid_mask")
    negative = ImageJob.negative_prompt if options.negative_prompt is None else options.negative_prompt
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    return ImageJob(prompt=options.prompt, width=width, height=height, images=images, n=options.n, seed=seed,
                    num_inference_steps=steps, true_cfg_scale=cfg, negative_prompt=negative,
                    partial_images=options.partial_images if options.stream else 0, mask=mask,
                    output_format=options.output_format, output_compression=options.output_compression)


async def _read_upload(upload: UploadFile, param: str, limits: ImageLimits) -> Any:
    if upload.size is not None and upload.size > limits.max_bytes:
        raise bad_request(f"{param} is {upload.size} bytes, over this server's limit of {limits.max_bytes} bytes "
                          f"per image", param=param, code="image_too_large")
    data = await upload.read(limits.max_bytes + 1)
    try:
        return await asyncio.to_thread(load_image, data, limits)
    except ImageError as exc:
        raise bad_request(f"{param} ({upload.filename or 'unnamed'}): {exc}", param=param,
                          code="invalid_image") from None


async def read_images(uploads: list[UploadFile], mask: UploadFile | None, pipeline: ImagePipeline,
                      config: ServerConfig) -> tuple[list[Any], Any]:
    kind = pipeline.kind
    if len(uploads) < kind.min_images:
        raise bad_request(f"the image model '{pipeline.name}' needs at least {kind.min_images} image "
                          "(send image[] files)", param="image", code="missing_image")
    if len(uploads) > kind.max_images:
        raise bad_request(f"the request has {len(uploads)} images; the image model '{pipeline.name}' "
                          f"({kind.class_name}) takes at most {kind.max_images}", param="image",
                          code="too_many_images")
    limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    images = [_to_rgb(await _read_upload(u, f"image[{i}]", limits)) for i, u in enumerate(uploads)]
    mask_image = await _read_upload(mask, "mask", limits) if mask is not None else None
    return images, mask_image


# ------------------------------------------------------------------------------------------ responses


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _collect(handle: JobHandle) -> list[FinishedImage]:
    return [e async for e in handle.events() if isinstance(e, FinishedImage)]


def _submit(service: ImageService, job: ImageJob) -> JobHandle:
    try:
        return service.queue.submit(job)
    except QueueFull as exc:
        raise queue_full(exc.retry_after_s, str(exc)) from None


async def respond(request: Request, service: ImageService, pipeline: ImagePipeline, job: ImageJob,
                  options: ImageOptions, prefix: str) -> Any:
    handle = _submit(service, job)
    size = f"{job.width}x{job.height}"
    common = {"size": size, "output_format": job.output_format, "quality": "auto", "background": "opaque"}
    usage = pipeline.token_usage(job.prompt, job.images, job.width, job.height, job.n)
    if not options.stream:
        try:
            finished = await unless_disconnected(request, _collect(handle))
        except ClientDisconnected:
            handle.cancel()
            raise APIError(499, "the client closed the request") from None
        except JobCancelled:
            raise APIError(499, "the request was cancelled") from None
        except Exception as exc:
            raise from_exception(exc, service.config.retry_after_s) from None
        finally:
            handle.cancel()  # a no-op once finished; stops the job if this handler was cancelled
        data = [{"b64_json": _b64(f.data), "revised_prompt": None, "seed": f.seed} for f in finished]
        return JSONResponse({"created": int(time.time()), "data": data, **common, "usage": usage})

    async def events() -> AsyncIterator[str]:
        try:
            async for event in handle.events():
                now = int(time.time())
                if isinstance(event, Progress):
                    yield sse({"type": f"{prefix}.progress", "progress": round(event.fraction, 4),
                               "step": event.step, "total_steps": job.num_inference_steps,
                               "image_index": event.image_index, "created_at": now})
                elif isinstance(event, PartialImage):
                    yield sse({"type": f"{prefix}.partial_image", "b64_json": _b64(event.data), "created_at": now,
                               "partial_image_index": event.partial_index, "image_index": event.image_index,
                               **common})
                elif isinstance(event, FinishedImage):
                    yield sse({"type": f"{prefix}.completed", "b64_json": _b64(event.data), "created_at": now,
                               "image_index": event.image_index, "seed": event.seed, **common,
                               "usage": _one_image(usage, job.n)})
            yield DONE
        except Exception as exc:  # the status line is sent: the failure becomes an error frame
            yield error_frame(from_exception(exc, service.config.retry_after_s))
            yield DONE
        finally:
            handle.cancel()  # the client went away (the generator is closed) or the job ended

    return ClosingStreamingResponse(events())


def _one_image(usage: dict[str, Any], n: int) -> dict[str, Any]:
    """A completed event's usage: the request's input, and the output of that one image (of `n`)."""
    made = usage["output_tokens"] // n
    return {**usage, "output_tokens": made, "total_tokens": usage["input_tokens"] + made}


# ------------------------------------------------------------------------------------------ routes


def _router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/edits")
    async def edit_images(
        request: Request,
        prompt: str = Form(...),
        images: list[UploadFile] = File(default_factory=list, alias="image[]"),
        image: list[UploadFile] = File(default_factory=list, description="one image (OpenAI's single form)"),
        mask: UploadFile | None = File(None),
        model: str | None = Form(None),
        n: int = Form(1),
        size: str = Form("auto"),
        response_format: str = Form("b64_json"),
        output_format: str = Form("png"),
        output_compression: int | None = Form(None),
        stream: bool = Form(False),
        partial_images: int = Form(0),
        negative_prompt: str | None = Form(None),
        num_inference_steps: int | None = Form(None),
        true_cfg_scale: float | None = Form(None),
        seed: int | None = Form(None),
        quality: str | None = Form(None),
        background: str | None = Form(None),
        input_fidelity: str | None = Form(None),
        user: str | None = Form(None),
    ) -> Any:
        fields = dict(prompt=prompt, model=model, n=n, size=size, response_format=response_format,
                      output_format=output_format, output_compression=output_compression, stream=stream,
                      partial_images=partial_images, negative_prompt=negative_prompt,
                      num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale, seed=seed)
        options = parse(ImageOptions, {k: v for k, v in fields.items() if v is not None})
        service = get_service(request)
        pipeline = service.ready_pipeline("edit", options.model)
        pictures, mask_image = await read_images(images + image, mask, pipeline, service.config)
        job = build_job(options, pipeline, pictures, mask_image, service.limits)
        return await respond(request, service, pipeline, job, options, "image_edit")

    @router.post("/v1/images/generations")
    async def generate_images(request: Request, body: ImageOptions) -> Any:
        service = get_service(request)
        pipeline = service.ready_pipeline("generate", body.model)
        job = build_job(body, pipeline, [], None, service.limits)
        return await respond(request, service, pipeline, job, body, "image_generation")

    return router


def install_image_api(app: FastAPI, config: ServerConfig, pipeline: ImagePipeline | None = None,
                      chat_busy: Callable[[], bool] | None = None) -> ImageService:
    """Adds the image routes; `pipeline` is served at once, else `config.image_model` loads on `start`."""
    service = ImageService(config, config.image_limits, chat_busy)
    if pipeline is not None:
        service.serve(pipeline)
    app.state.qwenstack_images = service
    app.include_router(_router())
    return service
