"""Image jobs in the server: overhead per job against diffusers called directly, and chat latency while an
image job runs, in one run on tiny random Qwen-Image pipelines (tests/image_pipelines.py, built offline).

    python benchmarks/bench_imagegen.py                     # writes benchmarks/out/imagegen-tiny.json
    python benchmarks/bench_imagegen.py --parts overhead,fixed --out imagegen-overhead

1. Overhead, end to end: the same Edit-Plus job (two 64x64 input images, a 64x64 output, 8 steps, true CFG:
   ~0.6 s of CPU) three ways in every round: diffusers called directly (`pipe(...)`, returning a PIL image),
   through `POST /v1/images/edits` (multipart upload, decoding, the queue, the worker thread, PNG encoding,
   base64, JSON) and the same request streamed (a progress event per step). The server runs in this
   process (uvicorn in a thread, an httpx client in another), so the process CPU time (getrusage: every
   thread) counts the client, the server and the pipeline alike. The order rotates every round so a load
   change on the machine hits all three; the figures are medians over the rounds of wall and CPU time, and
   the median of each round's server/direct ratio. The direct call runs on its own thread at the image
   worker's OS priority: once both at nice 0 (the server's own overhead), once both at the worker's
   default nice 10. Idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE): on shared cores, spinning
   threads turn other processes' load into CPU time of this one, the same for both arms but noisy.
2. The server's own work alone (`fixed_cost`): the same request answered by a worker that skips the
   pipeline and only encodes a 64x64 PNG; its median over the direct call's median is the overhead without
   the pipeline's run-to-run noise.
3. Chat next to an image job: the bundled demo model answers the same 32-token chat request (greedy) with
   the image worker idle, then while a long image job (two 256x256 inputs and output) runs in the same
   server, in alternating cycles (so load from elsewhere hits both phases), once with the worker at its
   default priority offset (nice 10) and once without (nice 0). Median latencies.

The input images are resized to a 64x64 area before the VAE and the vision encoder (as in the tests).
"""
from __future__ import annotations

import argparse
import io
import os
import queue
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see the module docstring
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import save, threads, timed  # noqa: E402
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


def _on_thread_at_nice(nice: int) -> Callable[[Callable[[], Any]], Any]:
    """A runner that calls functions on one thread at OS priority offset `nice` (as the image worker runs),
    so the direct diffusers call competes for the cores exactly as the server's worker does."""
    calls: queue.Queue = queue.Queue()

    def work() -> None:
        if nice > 0:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        while (item := calls.get()) is not None:
            fn, done = item
            try:
                done.put((fn(), None))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                done.put((None, exc))

    threading.Thread(target=work, daemon=True, name=f"direct-nice-{nice}").start()

    def run(fn: Callable[[], Any]) -> Any:
        done: queue.Queue = queue.Queue()
        calls.put((fn, done))
        result, error = done.get()
        if error is not None:
            raise error
        return result

    run.stop = lambda: calls.put(None)  # type: ignore[attr-defined]
    return run


def overhead(plus: ImagePipeline, rounds: int, steps: int, side: int, nice: int) -> dict[str, Any]:
    """`rounds` rounds of the same job three ways (diffusers called directly, the server, the server
    streaming a progress event per step), the order rotating every round so that a change of load on the
    machine, caches and the allocator's state hit all three alike; medians of wall and process CPU time,
    and the median of the per-round ratios (each server call against the direct call of its own round)."""
    images = [noise(side, 1), noise(side, 2)]
    files = [("image[]", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    form = {"prompt": PROMPT, "size": f"{side}x{side}", "num_inference_steps": str(steps), "seed": "3"}
    names = ("direct", "server", "streamed")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    on_thread = _on_thread_at_nice(nice)
    with BackgroundServer(create_app([], ServerConfig(enable_ui=False, image_nice=nice), image_pipeline=plus)) as server:
        url = f"{server.url}/v1/images/edits"
        with httpx.Client(timeout=600) as client:

            def streamed() -> None:
                with client.stream("POST", url, data={**form, "stream": "true"}, files=files) as response:
                    for _ in response.iter_lines():
                        pass

            runs = {
                "direct": lambda: on_thread(lambda: plus.pipe(
                    image=images, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=side, width=side,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(3))),
                "server": lambda: client.post(url, data=form, files=files).raise_for_status(),
                "streamed": streamed,
            }
            for name in names:  # warm-up: the worker's and the direct thread's first OpenMP team
                runs[name]()
            for r in range(rounds):
                order = names[r % 3:] + names[:r % 3]
                for name in order:
                    t, c = time.perf_counter(), _cpu_s()
                    runs[name]()
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(_cpu_s() - c)
    on_thread.stop()  # type: ignore[attr-defined]
    median = statistics.median
    result: dict[str, Any] = {"nice": nice, "rounds": rounds, "steps": steps, "size": side,
                              "median_wall_s": {k: median(v) for k, v in wall.items()},
                              "median_cpu_s": {k: median(v) for k, v in cpu.items()}}
    for name in ("server", "streamed"):
        result[f"{name}_wall"] = median(wall[name]) / median(wall["direct"]) - 1
        result[f"{name}_cpu"] = median(cpu[name]) / median(cpu["direct"]) - 1
        result[f"{name}_wall_paired"] = median(s / d for s, d in zip(wall[name], wall["direct"])) - 1
        result[f"{name}_cpu_paired"] = median(s / d for s, d in zip(cpu[name], cpu["direct"])) - 1
    result["all"] = {"wall": wall, "cpu": cpu}
    return result


def fixed_cost(plus: ImagePipeline, rounds: int, direct: dict[str, float]) -> dict[str, Any]:
    """The server's own work per job, without the pipeline: the same requests (plain and streamed) answered
    by a worker whose job emits a progress event per step (as run_job does) and PNG-encodes a 64x64 image
    (the multipart upload, decoding, the queue, the thread hand-offs, the events, base64 and JSON all stay).
    Medians of wall and process CPU time over `rounds`, and their share of the direct diffusers call's
    (`direct`: median wall_s and cpu_s), free of the pipeline's run-to-run noise."""
    from qwenstack.imagegen.jobs import FinishedImage, Progress, encode_image
    from qwenstack.imagegen.queue import ImageJobQueue

    made = noise(64, 9)

    def no_pipeline(pipeline: Any, job: Any, emit: Any, cancelled: Any, between_steps: Any) -> None:
        for step in range(job.num_inference_steps):
            emit(Progress(0, step + 1, step + 1, job.total_steps))
            between_steps()
        emit(FinishedImage(0, encode_image(made, job.output_format), job.seed))

    images = [noise(64, 1), noise(64, 2)]
    files = [("image[]", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    form = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": "8", "seed": "3"}
    app = create_app([], ServerConfig(enable_ui=False, image_nice=0), image_pipeline=plus)
    service = app.state.qwenstack_images
    service.queue.close()
    service.queue = ImageJobQueue(plus, runner=no_pipeline, nice=0)
    wall: dict[str, list[float]] = {"server": [], "streamed": []}
    cpu: dict[str, list[float]] = {"server": [], "streamed": []}
    with BackgroundServer(app) as server, httpx.Client(timeout=60) as client:
        url = f"{server.url}/v1/images/edits"

        def streamed() -> None:
            with client.stream("POST", url, data={**form, "stream": "true"}, files=files) as response:
                for _ in response.iter_lines():
                    pass

        runs = {"server": lambda: client.post(url, data=form, files=files).raise_for_status(), "streamed": streamed}
        for r in range(rounds + 2):
            for name, run in runs.items():
                t, c = time.perf_counter(), _cpu_s()
                run()
                if r >= 2:  # the first two are warm-up
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(_cpu_s() - c)
    out: dict[str, Any] = {}
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        out[name] = {"median_wall_s": w, "median_cpu_s": c, "share_wall": w / direct["wall_s"],
                     "share_cpu": c / direct["cpu_s"]}
    out["all"] = {"wall": wall, "cpu": cpu}
    return out


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
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--side", type=int, default=64, help="output image side in pixels (overhead part)")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--chat-requests", type=int, default=4, help="per cycle and phase")
    parser.add_argument("--image-steps", type=int, default=1000)
    parser.add_argument("--parts", default="overhead,fixed,chat", help="which of overhead,fixed,chat to run")
    parser.add_argument("--out", default="imagegen-tiny")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(threads())
    import tempfile

    result: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        small_condition_sizes(mp)
        plus = load_image_pipeline(str(build_image_pipelines(Path(tmp))["edit_plus"]), name="qwen-image-edit")
        if "overhead" in parts:
            result["overhead"] = [overhead(plus, args.rounds, args.steps, args.side, nice) for nice in (0, 10)]
        if "fixed" in parts:
            if "overhead" in result:
                o = result["overhead"][0]
                direct = {"wall_s": o["median_wall_s"]["direct"], "cpu_s": o["median_cpu_s"]["direct"]}
            else:
                c = _cpu_s()
                _, wall_s = timed(lambda: plus.pipe(image=[noise(64, 1), noise(64, 2)], prompt=PROMPT, height=64,
                                                    width=64, num_inference_steps=args.steps, true_cfg_scale=4.0,
                                                    negative_prompt=" "))
                direct = {"wall_s": wall_s, "cpu_s": _cpu_s() - c}
            result["fixed_cost"] = fixed_cost(plus, 4 * args.rounds, direct)
        if "chat" in parts:
            result["chat"] = [chat_beside_images(plus, args.cycles, args.chat_requests, nice, args.image_steps)
                              for nice in (10, 0)]
    for o in result.get("overhead", []):
        w, c = o["median_wall_s"], o["median_cpu_s"]
        print(f"job {o['size']}x{o['size']}, {o['steps']} steps, worker and direct call at nice {o['nice']}, "
              f"{o['rounds']} rounds, medians: wall direct {w['direct'] * 1000:.0f} ms, "
              f"server {w['server'] * 1000:.0f} ms ({o['server_wall']:+.1%}; paired {o['server_wall_paired']:+.1%}), "
              f"streamed {w['streamed'] * 1000:.0f} ms ({o['streamed_wall']:+.1%}; paired "
              f"{o['streamed_wall_paired']:+.1%}) | process CPU direct {c['direct'] * 1000:.0f} ms, "
              f"server {c['server'] * 1000:.0f} ms ({o['server_cpu']:+.1%}; paired {o['server_cpu_paired']:+.1%}), "
              f"streamed {c['streamed'] * 1000:.0f} ms ({o['streamed_cpu']:+.1%}; paired "
              f"{o['streamed_cpu_paired']:+.1%})")
    if "fixed_cost" in result:
        for name in ("server", "streamed"):
            f = result["fixed_cost"][name]
            print(f"server work per {name} job without the pipeline (medians): wall {f['median_wall_s'] * 1000:.1f} ms "
                  f"= {f['share_wall']:.1%} of the direct call's, process CPU {f['median_cpu_s'] * 1000:.1f} ms = "
                  f"{f['share_cpu']:.1%}")
    for c in result.get("chat", []):
        print(f"chat (nice {c['nice']}): idle {c['idle_s'] * 1000:.0f} ms, beside an image job "
              f"{c['busy_s'] * 1000:.0f} ms ({c['ratio']:.2f}x); image steps meanwhile {c['image_steps_during_chat']}")
    print(save(args.out, result))


if __name__ == "__main__":
    main()
