"""Image jobs in the server: overhead per job against diffusers called directly, and chat latency while an
image job runs, in one run on tiny random Qwen-Image pipelines (tests/image_pipelines.py, built offline).

    python benchmarks/bench_imagegen.py                     # writes benchmarks/out/imagegen-tiny.json

1. Overhead: the same Edit-Plus job (two 64x64 input images, a 64x64 output, 8 steps, true CFG) called
   directly (`pipe(...)`, returning a PIL image) and through `POST /v1/images/edits` (multipart upload,
   decoding, the queue, PNG encoding, base64, JSON), alternated round by round so a load change on the
   machine hits both; medians. Also the streamed request (a progress event per step). Once with the image
   worker at nice 0 (the server's own overhead) and once at its default nice 10 (on a machine shared with
   other work, the image job then yields to that work too).
2. Chat next to an image job: the bundled demo model answers the same 32-token chat request (greedy) with
   the image worker idle, then while a long image job (256x256, many steps) runs in the same server, once
   with the worker at its default priority offset (nice 10) and once without (nice 0). Idle is measured
   before and after the image job. Medians.

The input images are resized to a 64x64 area before the VAE and the vision encoder (as in the tests), so
the job is short and the server's share of it is as large as it can be.
"""
from __future__ import annotations

import argparse
import io
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


def overhead(plus: ImagePipeline, rounds: int, steps: int, nice: int) -> dict[str, Any]:
    images = [noise(64, 1), noise(64, 2)]
    files = [("image[]", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    form = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": str(steps), "seed": "3"}
    direct, served, streamed = [], [], []
    with BackgroundServer(create_app([], ServerConfig(enable_ui=False, image_nice=nice), image_pipeline=plus)) as server:
        url = f"{server.url}/v1/images/edits"
        with httpx.Client(timeout=600) as client:
            client.post(url, data=form, files=files).raise_for_status()  # warm-up
            for _ in range(rounds):
                t = time.perf_counter()
                plus.pipe(image=images, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64,
                          num_inference_steps=steps, generator=torch.Generator().manual_seed(3))
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.post(url, data=form, files=files).raise_for_status()
                served.append(time.perf_counter() - t)
                t = time.perf_counter()
                with client.stream("POST", url, data={**form, "stream": "true"}, files=files) as response:
                    for _ in response.iter_lines():
                        pass
                streamed.append(time.perf_counter() - t)
    d, s, st = (statistics.median(x) for x in (direct, served, streamed))
    return {"nice": nice, "rounds": rounds, "steps": steps, "direct_s": d, "server_s": s, "server_streamed_s": st,
            "overhead": s / d - 1, "overhead_streamed": st / d - 1,
            "all": {"direct": direct, "server": served, "streamed": streamed}}


def chat_latencies(client: httpx.Client, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        response = client.post(f"{url}/v1/chat/completions", json=CHAT)
        response.raise_for_status()
        assert response.json()["usage"]["completion_tokens"] == 32
        out.append(time.perf_counter() - t)
    return out


def chat_beside_images(plus: ImagePipeline, n: int, nice: int, image_steps: int) -> dict[str, Any]:
    chat_model = load_served_model(ModelSpec(model=None), 2**26)
    config = ServerConfig(enable_ui=False, image_nice=nice, image_limits=ImageRequestLimits(max_steps=image_steps))
    with BackgroundServer(create_app([chat_model], config, image_pipeline=plus)) as server, \
            httpx.Client(timeout=600) as client:
        chat_latencies(client, server.url, 2)  # warm-up
        idle = chat_latencies(client, server.url, n)  # and again after the image job, so load drift hits both
        steps_done: list[int] = []
        stop = threading.Event()

        def image_job() -> None:
            files = [("image[]", (f"{i}.png", png(noise(256, i)), "image/png")) for i in range(2)]
            data = {"prompt": PROMPT, "size": "256x256", "num_inference_steps": str(image_steps), "stream": "true"}
            with httpx.stream("POST", f"{server.url}/v1/images/edits", data=data, files=files, timeout=600) as r:
                for line in r.iter_lines():
                    if '"progress"' in line:
                        steps_done.append(1)
                    if stop.is_set():
                        return  # closing the stream cancels the job

        worker = threading.Thread(target=image_job)
        worker.start()
        while not steps_done:
            time.sleep(0.05)
        busy = chat_latencies(client, server.url, n)
        finished_during = len(steps_done) >= image_steps
        stop.set()
        worker.join()
        idle += chat_latencies(client, server.url, n)
    idle_m, busy_m = statistics.median(idle), statistics.median(busy)
    return {"nice": nice, "idle_s": idle_m, "busy_s": busy_m, "ratio": busy_m / idle_m,
            "image_steps_during_chat": len(steps_done), "image_job_ended_early": finished_during,
            "all": {"idle": idle, "busy": busy}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--chat-requests", type=int, default=12)
    parser.add_argument("--image-steps", type=int, default=1000)
    parser.add_argument("--out", default="imagegen-tiny")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        small_condition_sizes(mp)
        plus = load_image_pipeline(str(build_image_pipelines(Path(tmp))["edit_plus"]), name="qwen-image-edit")
        result = {"overhead": [overhead(plus, args.rounds, args.steps, nice) for nice in (0, 10)],
                  "chat": [chat_beside_images(plus, args.chat_requests, nice, args.image_steps) for nice in (10, 0)]}
    for o in result["overhead"]:
        print(f"job (worker nice {o['nice']}): direct {o['direct_s'] * 1000:.1f} ms, server {o['server_s'] * 1000:.1f} ms "
              f"({o['overhead']:+.1%}), streamed {o['server_streamed_s'] * 1000:.1f} ms ({o['overhead_streamed']:+.1%})")
    for c in result["chat"]:
        print(f"chat (nice {c['nice']}): idle {c['idle_s'] * 1000:.0f} ms, beside an image job "
              f"{c['busy_s'] * 1000:.0f} ms ({c['ratio']:.2f}x); image steps meanwhile {c['image_steps_during_chat']}")
    print(save(args.out, result))


if __name__ == "__main__":
    main()
