"""Image jobs in the server: overhead per job against diffusers called directly, and chat latency while an
image job runs, in one run on tiny random Qwen-Image pipelines (tests/image_pipelines.py, built offline).

    python benchmarks/bench_imagegen.py                     # writes benchmarks/out/imagegen-tiny.json

1. Overhead: the same Edit-Plus job (two 64x64 input images, a 64x64 output, 8 steps, true CFG) called
   directly (`pipe(...)`, returning a PIL image) and through `POST /v1/images/edits` (multipart upload,
   decoding, the queue, PNG encoding, base64, JSON), alternated round by round so a load change on the
   machine hits both; the best wall time of each (the least disturbed by other work on the machine) and the
   median CPU time of this whole process (server, worker and the client) per job. Also the streamed request
   (a progress event per step). Once with the image
   worker at nice 0 (the server's own overhead) and once at its default nice 10 (on a machine shared with
   other work, the image job then yields to that work too).
   The server's own work is also timed alone (`fixed_cost`): the same request answered by a worker that
   skips the pipeline and only encodes a 64x64 PNG; its median over the direct call's median is the
   overhead without the pipeline's run-to-run noise.
2. Chat next to an image job: the bundled demo model answers the same 32-token chat request (greedy) with
   the image worker idle, then while a long image job (two 256x256 inputs and output) runs in the same
   server, in alternating cycles (so load from elsewhere hits both phases), once with the worker at its
   default priority offset (nice 10) and once without (nice 0). Median latencies.

The input images are resized to a 64x64 area before the VAE and the vision encoder (as in the tests), so
the job is short and the server's share of it is as large as it can be.
"""
from __future__ import annotations

import argparse
import io
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import save, threads  # noqa: E402
from image_pipelines import build_image_pipelines, small_condition_sizes  # noqa: E402
from server_utils import BackgroundServer  # noqa: E402

from qwenstack.imagegen.limits import ImageRequestLimits  # noqa: E402
from qwenstack.imagegen.pipelines import ImagePipeline, load_image_pipeline  # noqa: E402
from qwenstack.serving.app import create_app  # noqa: E402
from qwenstack.serving.config import ModelSpec, ServerConfig  # noqa: E402
from qwenstack.serving.served import load_served_model  # noqa: E402

PROMPT = "put the two objects side by side on a table"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Tell me a story about a fox."}],
        "max_tokens": 32, "ignore_eos": True, "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noise(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process: server, worker, client
    return usage.ru_utime + usage.ru_stime


def overhead(plus: ImagePipeline, rounds: int, steps: int, nice: int) -> dict[str, Any]:
    images = [noise(64, 1), noise(64, 2)]
    files = [("image[]", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    form = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": str(steps), "seed": "3"}
    wall: dict[str, list[float]] = {"direct": [], "server": [], "streamed": []}
    cpu: dict[str, list[float]] = {"direct": [], "server": [], "streamed": []}
    with BackgroundServer(create_app([], ServerConfig(enable_ui=False, image_nice=nice), image_pipeline=plus)) as server:
        url = f"{server.url}/v1/images/edits"
        with httpx.Client(timeout=600) as client:
            client.post(url, data=form, files=files).raise_for_status()  # warm-up

            def streamed() -> None:
                with client.stream("POST", url, data={**form, "stream": "true"}, files=files) as response:
                    for _ in response.iter_lines():
                        pass

            runs = {
                "direct": lambda: plus.pipe(image=images, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0,
                                            height=64, width=64, num_inference_steps=steps,
                                            generator=torch.Generator().manual_seed(3)),
                "server": lambda: client.post(url, data=form, files=files).raise_for_status(),
                "streamed": streamed,
            }
            for _ in range(rounds):
                for name, run in runs.items():
                    t, c = time.perf_counter(), _cpu_s()
                    run()
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(_cpu_s() - c)
    best = {k: min(v) for k, v in wall.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    return {"nice": nice, "rounds": rounds, "steps": steps, "best_wall_s": best, "median_cpu_s": cpu_median,
            "overhead_wall": best["server"] / best["direct"] - 1,
            "overhead_wall_streamed": best["streamed"] / best["direct"] - 1,
            "overhead_cpu": cpu_median["server"] / cpu_median["direct"] - 1,
            "overhead_cpu_streamed": cpu_median["streamed"] / cpu_median["direct"] - 1,
            "all": {"wall": wall, "cpu": cpu}}


def fixed_cost(plus: ImagePipeline, rounds: int, direct_s: float) -> dict[str, Any]:
    """The server's own work per job, without the pipeline: the same request answered by a worker whose
    job only PNG-encodes a 64x64 image (the multipart upload, decoding, the queue, the thread hand-offs,
    base64 and JSON all stay). Its ratio to the diffusers call is the overhead, free of the pipeline's noise."""
    from qwenstack.imagegen.jobs import FinishedImage, encode_image
    from qwenstack.imagegen.queue import ImageJobQueue

    made = noise(64, 9)

    def no_pipeline(pipeline: Any, job: Any, emit: Any, *hooks: Any) -> None:
        emit(FinishedImage(0, encode_image(made, job.output_format), job.seed))

    images = [noise(64, 1), noise(64, 2)]
    files = [("image[]", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    form = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": "8", "seed": "3"}
    app = create_app([], ServerConfig(enable_ui=False), image_pipeline=plus)
    service = app.state.qwenstack_images
    service.queue.close()
    service.queue = ImageJobQueue(plus, runner=no_pipeline)
    times = []
    with BackgroundServer(app) as server, httpx.Client(timeout=60) as client:
        for _ in range(rounds + 2):
            t = time.perf_counter()
            client.post(f"{server.url}/v1/images/edits", data=form, files=files).raise_for_status()
            times.append(time.perf_counter() - t)
    times = times[2:]
    return {"median_s": statistics.median(times), "best_s": min(times),
            "overhead": statistics.median(times) / direct_s, "all": times}


def chat_latencies(client: httpx.Client, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        response = client.post(f"{url}/v1/chat/completions", json=CHAT)
        response.raise_for_status()
        assert response.json()["usage"]["completion_tokens"] == 32
        out.append(time.perf_counter() - t)
    return out


def chat_beside_images(plus: ImagePipeline, cycles: int, n: int, nice: int, image_steps: int) -> dict[str, Any]:
    """`cycles` times: n chat requests idle, then n while an image job runs (cancelled after them)."""
    chat_model = load_served_model(ModelSpec(model=None), 2**26)
    config = ServerConfig(enable_ui=False, image_nice=nice, image_limits=ImageRequestLimits(max_steps=image_steps))
    idle: list[float] = []
    busy: list[float] = []
    steps_done: list[int] = []
    with BackgroundServer(create_app([chat_model], config, image_pipeline=plus)) as server, \
            httpx.Client(timeout=600) as client:
        chat_latencies(client, server.url, 2)  # warm-up
        for _ in range(cycles):
            idle += chat_latencies(client, server.url, n)
            progress: list[int] = []
            stop = threading.Event()

            def image_job() -> None:
                files = [("image[]", (f"{i}.png", png(noise(256, i)), "image/png")) for i in range(2)]
                data = {"prompt": PROMPT, "size": "256x256", "num_inference_steps": str(image_steps), "stream": "true"}
                with httpx.stream("POST", f"{server.url}/v1/images/edits", data=data, files=files, timeout=600) as r:
                    for line in r.iter_lines():
                        if '"progress"' in line:
                            progress.append(1)
                        if stop.is_set():
                            return  # closing the stream cancels the job

            worker = threading.Thread(target=image_job)
            worker.start()
            while not progress:
                time.sleep(0.02)
            before = len(progress)
            busy += chat_latencies(client, server.url, n)
            steps_done.append(len(progress) - before)
            stop.set()
            worker.join()
    idle_m, busy_m = statistics.median(idle), statistics.median(busy)
    return {"nice": nice, "idle_s": idle_m, "busy_s": busy_m, "ratio": busy_m / idle_m,
            "image_steps_during_chat": steps_done, "all": {"idle": idle, "busy": busy}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--chat-requests", type=int, default=4, help="per cycle and phase")
    parser.add_argument("--image-steps", type=int, default=1000)
    parser.add_argument("--out", default="imagegen-tiny")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        small_condition_sizes(mp)
        plus = load_image_pipeline(str(build_image_pipelines(Path(tmp))["edit_plus"]), name="qwen-image-edit")
        result = {"overhead": [overhead(plus, args.rounds, args.steps, nice) for nice in (0, 10)]}
        direct = statistics.median(result["overhead"][0]["all"]["wall"]["direct"])
        result["fixed_cost"] = fixed_cost(plus, 4 * args.rounds, direct)
        result |= {
                  "chat": [chat_beside_images(plus, args.cycles, args.chat_requests, nice, args.image_steps)
                           for nice in (10, 0)]}
    for o in result["overhead"]:
        w, c = o["best_wall_s"], o["median_cpu_s"]
        print(f"job (worker nice {o['nice']}): best wall direct {w['direct'] * 1000:.0f} ms, server "
              f"{w['server'] * 1000:.0f} ms ({o['overhead_wall']:+.1%}), streamed {w['streamed'] * 1000:.0f} ms "
              f"({o['overhead_wall_streamed']:+.1%}); median CPU direct {c['direct'] * 1000:.0f} ms, server "
              f"{c['server'] * 1000:.0f} ms ({o['overhead_cpu']:+.1%}), streamed {c['streamed'] * 1000:.0f} ms "
              f"({o['overhead_cpu_streamed']:+.1%})")
    f = result["fixed_cost"]
    print(f"server work per job without the pipeline: median {f['median_s'] * 1000:.1f} ms "
          f"(best {f['best_s'] * 1000:.1f} ms) = {f['overhead']:.1%} of the diffusers call")
    for c in result["chat"]:
        print(f"chat (nice {c['nice']}): idle {c['idle_s'] * 1000:.0f} ms, beside an image job "
              f"{c['busy_s'] * 1000:.0f} ms ({c['ratio']:.2f}x); image steps meanwhile {c['image_steps_during_chat']}")
    print(save(args.out, result))


if __name__ == "__main__":
    main()
