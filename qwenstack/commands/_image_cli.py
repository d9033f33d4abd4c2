"""What `qwenstack edit` and `qwenstack imagine` share: their options, a progress bar over the denoising
steps, and running one job in this process (qwenstack.imagegen, the same code the server's worker runs).

They run the pipeline in-process rather than through a server: one command, one image, no server to
start; `qwenstack serve --image-model` is the way to keep a model loaded between requests.
"""
from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from qwenstack.commands._common import positive_int

EXTENSION_FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpeg", ".jpeg": "jpeg"}


def add_image_options(parser: argparse.ArgumentParser, default_model: str, default_output: str) -> None:
    parser.add_argument("-p", "--prompt", required=True, help="what to make, or what to change")
    parser.add_argument("-o", "--output", default=default_output,
                        help=f"where to write the image (.png, .webp or .jpg; default: {default_output}); "
                             "with -n N, NAME-1.png ... NAME-N.png")
    parser.add_argument("-m", "--model", default=default_model,
                        help=f"a Qwen-Image pipeline directory or hub id (default: {default_model})")
    parser.add_argument("-n", type=positive_int, default=1, help="how many images (seeds SEED, SEED+1, ...)")
    parser.add_argument("--size", default="auto", help="WIDTHxHEIGHT, multiples of 16 (default: the model's)")
    parser.add_argument("--steps", type=positive_int, default=40, help="denoising steps (default: 40)")
    parser.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (default: 4.0; 1 turns it off)")
    parser.add_argument("--negative-prompt", default=" ", help="what to steer away from (default: blank)")
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same image (default: random)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--offload", default="auto", choices=("auto", "none", "model", "sequential"),
                        help="diffusers' CPU offloading on CUDA (default: auto, when the weights do not fit)")


class ProgressBar:
    """`[#######.............] 14/40 steps  3.2 s` on one line of stderr, redrawn after every step."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream or sys.stderr, width
        self.started = time.monotonic()

    def update(self, done: int) -> None:
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r[{bar}] {done}/{self.total} steps  {elapsed:.1f} s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def output_paths(output: str, n: int) -> tuple[list[Path], str]:
    path = Path(output)
    fmt = EXTENSION_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"--output must end in {', '.join(EXTENSION_FORMATS)}, got {output!r}")
    if n == 1:
        return [path], fmt
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(n)], fmt


def run_image_command(args: argparse.Namespace, task: str, images: list[Any], mask: Any = None) -> int:
    from qwenstack.imagegen.jobs import FinishedImage, ImageJob, Progress, run_job
    from qwenstack.imagegen.limits import ImageRequestLimits, parse_size
    from qwenstack.imagegen.pipelines import load_image_pipeline

    paths, fmt = output_paths(args.output, args.n)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    pipeline = load_image_pipeline(args.model, device=args.device, offload=args.offload)
    kind = pipeline.kind
    if kind.task != task:
        other = "qwenstack edit" if kind.task == "edit" else "qwenstack imagine"
        raise ValueError(f"{args.model} is a {kind.class_name}: use `{other}`")
    if not kind.min_images <= len(images) <= kind.max_images:
        raise ValueError(f"{kind.class_name} takes {kind.min_images} to {kind.max_images} input images, "
                         f"got {len(images)}")
    if mask is not None and mask.size != images[0].size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the first image is "
                         f"{images[0].size[0]}x{images[0].size[1]}")
    limits = ImageRequestLimits(max_n=1_000, max_steps=10_000)  # the user's own machine: no server limits
    width, height = pipeline.auto_size(images) if args.size == "auto" else parse_size(
        args.size, pipeline.size_multiple, limits)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    job = ImageJob(prompt=args.prompt, width=width, height=height, images=images, n=args.n, seed=seed,
                   num_inference_steps=args.steps, true_cfg_scale=args.cfg, negative_prompt=args.negative_prompt,
                   mask=mask, output_format=fmt)
    bar = ProgressBar(job.total_steps)

    def on_event(event: Any) -> None:
        if isinstance(event, Progress):
            bar.update(event.steps_done)
        elif isinstance(event, FinishedImage):
            paths[event.image_index].write_bytes(event.data)

    try:
        run_job(pipeline, job, on_event)
    finally:
        bar.close()
    for path, index in zip(paths, range(job.n)):
        print(f"wrote {path} ({width}x{height}, seed {seed + index})", file=sys.stderr)
    return 0
