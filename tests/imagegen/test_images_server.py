"""/v1/images/edits and /v1/images/generations against tiny random Qwen-Image pipelines (tests/image_pipelines.py):
the server's image equals the diffusers pipeline called directly with the same inputs and seed (exactly, on
CPU) for Edit-Plus with two images, Edit and text-to-image; n=2 gives two different images; the streamed
final image equals the non-streamed one; the official `openai` SDK gets decodable PNGs; a client that goes
away cancels its job between steps; a full queue is a 429 with Retry-After; bad inputs are 400s naming
the limit."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import openai
from openai.types import ImageEditCompletedEvent
import pytest
import torch
from PIL import Image


from image_pipelines import build_image_pipelines, small_condition_sizes
from server_utils import BackgroundServer
from qwenstack.imagegen.limits import ImageRequestLimits
from qwenstack.imagegen.pipelines import ImagePipeline, load_image_pipeline
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

PROMPT = "dance monkey"
FAST = {"size": "32x32", "num_inference_steps": 2}
LONG_STEPS = 400  # a job that runs for seconds on the tiny pipeline
LONG_JOBS = ImageRequestLimits(max_steps=LONG_STEPS)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def direct(pipeline: ImagePipeline, images: list[Image.Image], seed: int, **kwargs: Any) -> np.ndarray:
    """The diffusers pipeline called the way its documentation shows (true CFG 4 against a blank negative
    prompt, as the server's defaults), with a CPU generator."""
    call = dict(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed))
    call.update(kwargs)
    if images:
        call["image"] = images if len(images) > 1 else images[0]
    return np.asarray(pipeline.pipe(**call).images[0])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with pytest.MonkeyPatch.context() as mp:
        small_condition_sizes(mp)
        yield build_image_pipelines(tmp_path_factory.mktemp("qwen-image"))


@pytest.fixture(scope="module")
def pipelines(dirs: dict[str, Path]) -> dict[str, ImagePipeline]:
    return {kind: load_image_pipeline(str(path), name=f"tiny-{kind}") for kind, path in dirs.items()}


def serve(pipeline: ImagePipeline, **config: Any) -> BackgroundServer:
    return BackgroundServer(create_app([], ServerConfig(enable_ui=False, **config), image_pipeline=pipeline))


def sdk(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


@pytest.fixture(scope="module")
def plus_server(pipelines: dict[str, ImagePipeline]) -> Iterator[BackgroundServer]:
    with serve(pipelines["edit_plus"], max_image_bytes=200_000, max_image_pixels=300 * 300) as server:
        yield server


IMAGE_A, IMAGE_B = noise(40, 32, 1), noise(32, 48, 2)


def edit_form(server: BackgroundServer, images: list[bytes], timeout: float = 60, **fields: Any) -> httpx.Response:
    files = [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    data = {"prompt": PROMPT, **FAST, **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{server.url}/v1/images/edits", data=data, files=files, timeout=timeout)


def test_edit_plus_two_images_n2_equals_diffusers(plus_server: BackgroundServer,
                                                   pipelines: dict[str, ImagePipeline]) -> None:
    response = edit_form(plus_server, [png(IMAGE_A), png(IMAGE_B)], n=2, seed=7)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "32x32" and [d["seed"] for d in body["data"]] == [7, 8]
    first, second = (pixels(d["b64_json"]) for d in body["data"])
    assert not np.array_equal(first, second), "n=2 must give two different images"
    plus = pipelines["edit_plus"]
    np.testing.assert_array_equal(first, direct(plus, [IMAGE_A, IMAGE_B], seed=7))
    np.testing.assert_array_equal(second, direct(plus, [IMAGE_A, IMAGE_B], seed=8))


def test_edit_single_image_with_the_sdk_equals_diffusers(pipelines: dict[str, ImagePipeline]) -> None:
    with serve(pipelines["edit"]) as server:
        result = sdk(server).images.edit(image=[("a.png", png(IMAGE_A), "image/png")], prompt=PROMPT,
                                         size="32x32", extra_body={"seed": 3, "num_inference_steps": 2})
    assert len(result.data) == 1
    np.testing.assert_array_equal(pixels(result.data[0].b64_json), direct(pipelines["edit"], [IMAGE_A], seed=3))


def test_generate_with_the_sdk_equals_diffusers(pipelines: dict[str, ImagePipeline]) -> None:
    with serve(pipelines["generate"]) as server:
        client = sdk(server)
        result = client.images.generate(prompt=PROMPT, size="32x32", n=2,
                                        extra_body={"seed": 11, "num_inference_steps": 2})
        models = {m.id: m for m in client.models.list().data}
        edit = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": PROMPT},
                          files=[("image[]", ("a.png", png(IMAGE_A), "image/png"))])
    images = [pixels(d.b64_json) for d in result.data]
    np.testing.assert_array_equal(images[0], direct(pipelines["generate"], [], seed=11))
    np.testing.assert_array_equal(images[1], direct(pipelines["generate"], [], seed=12))
    assert models["tiny-generate"].capabilities == ["image_generation"]  # type: ignore[attr-defined]
    assert edit.status_code == 400 and "/v1/images/generations" in edit.json()["error"]["message"]
    # OpenAI's usage: the prompt's tokens, and the latent patches of each image made (one a size_multiple square
    # of pixels: 2x2 latents of the VAE's downsampling).
    usage, patches = result.usage, (32 // pipelines["generate"].size_multiple) ** 2
    assert usage is not None and usage.input_tokens == usage.input_tokens_details.text_tokens > 0
    assert usage.output_tokens == 2 * patches and usage.total_tokens == usage.input_tokens + 2 * patches


def test_generate_takes_null_for_optional_fields(pipelines: dict[str, ImagePipeline],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's optional image fields are nullable (the SDK sends null for an argument given as None):
    null means the default."""
    # The pipeline's own default size, made 32x32: at the released 1024x1024 this test took 37 s of the suite.
    pipe = pipelines["generate"].pipe
    monkeypatch.setattr(pipe, "default_sample_size", 32 // pipe.vae_scale_factor)
    nulls = {"n": None, "size": None, "response_format": None, "output_format": None, "output_compression": None,
             "stream": None, "partial_images": None, "quality": None, "style": None, "user": None}
    with serve(pipelines["generate"]) as server:
        result = sdk(server).images.generate(prompt=PROMPT, n=None, size=None, response_format=None,
                                             extra_body={**nulls, "size": "32x32", "num_inference_steps": 1})
        raw = httpx.post(f"{server.url}/v1/images/generations", timeout=60,
                         json={"prompt": PROMPT, **nulls, "num_inference_steps": 1, "seed": 3})
    assert len(result.data) == 1 and pixels(result.data[0].b64_json).shape == (32, 32, 3)
    assert raw.status_code == 200, raw.text
    assert len(raw.json()["data"]) == 1 and raw.json()["output_format"] == "png"
    assert pixels(raw.json()["data"][0]["b64_json"]).shape == (32, 32, 3)  # the pipeline's default size


def test_sdk_edit_with_two_images_and_streaming(plus_server: BackgroundServer) -> None:
    client = sdk(plus_server)
    result = client.images.edit(image=[("a.png", png(IMAGE_A), "image/png"), ("b.png", png(IMAGE_B), "image/png")],
                                prompt=PROMPT, size="32x32", extra_body={"seed": 5, "num_inference_steps": 2})
    Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).load()  # a decodable PNG
    stream = client.images.edit(image=[("a.png", png(IMAGE_A), "image/png"), ("b.png", png(IMAGE_B), "image/png")],
                                prompt=PROMPT, size="32x32", stream=True, partial_images=1,
                                extra_body={"seed": 5, "num_inference_steps": 3})
    events = list(stream)
    types = [event.type for event in events]
    assert types[-1] == "image_edit.completed" and "image_edit.partial_image" in types
    # Every field the SDK's types require, usage among them (the two images' patches are input tokens).
    completed = ImageEditCompletedEvent.model_validate(events[-1].model_dump())
    assert completed.usage.input_tokens_details.image_tokens > 0 and completed.usage.output_tokens > 0


def test_streamed_final_image_equals_the_non_streamed_one(plus_server: BackgroundServer) -> None:
    images = [png(IMAGE_A), png(IMAGE_B)]
    plain = edit_form(plus_server, images, seed=9, num_inference_steps=4).json()["data"][0]["b64_json"]
    files = [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    data = {"prompt": PROMPT, "size": "32x32", "num_inference_steps": "4", "seed": "9", "stream": "true",
            "partial_images": "2"}
    with httpx.stream("POST", f"{plus_server.url}/v1/images/edits", data=data, files=files, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    progress = [e["progress"] for e in events if e["type"] == "image_edit.progress"]
    assert progress == [0.25, 0.5, 0.75, 1.0]
    partials = [e for e in events if e["type"] == "image_edit.partial_image"]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    pixels(partials[0]["b64_json"])
    completed = [e for e in events if e["type"] == "image_edit.completed"]
    assert len(completed) == 1 and completed[0]["b64_json"] == plain and completed[0]["size"] == "32x32"


@pytest.mark.parametrize("output_format, pil_format", [("webp", "WEBP"), ("jpeg", "JPEG")])
def test_webp_and_jpeg_outputs_decode_in_their_format(plus_server: BackgroundServer, output_format: str,
                                                      pil_format: str) -> None:
    images = [png(IMAGE_A), png(IMAGE_B)]
    lossless = pixels(edit_form(plus_server, images, seed=6).json()["data"][0]["b64_json"])
    encoded = {}
    for quality in (95, 10):
        response = edit_form(plus_server, images, seed=6, output_format=output_format, output_compression=quality)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["output_format"] == output_format
        encoded[quality] = base64.b64decode(body["data"][0]["b64_json"])
        image = Image.open(io.BytesIO(encoded[quality]))
        assert image.format == pil_format and image.size == (32, 32)
        # The same image as the PNG, encoded at that quality (PIL's encoders are deterministic).
        reference = io.BytesIO()
        Image.fromarray(lossless).save(reference, pil_format, quality=quality)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(Image.open(reference).convert("RGB")))
    assert len(encoded[10]) < len(encoded[95])  # output_compression reaches the encoder


def test_negative_prompt_and_true_cfg_scale_reach_the_pipeline(plus_server: BackgroundServer,
                                                                pipelines: dict[str, ImagePipeline]) -> None:
    images, plus = [png(IMAGE_A), png(IMAGE_B)], pipelines["edit_plus"]
    default = pixels(edit_form(plus_server, images, seed=4).json()["data"][0]["b64_json"])
    for fields in ({"negative_prompt": "blurry, low quality"}, {"true_cfg_scale": 2.5},
                   {"negative_prompt": "blurry, low quality", "true_cfg_scale": 7.0}):
        response = edit_form(plus_server, images, seed=4, **fields)
        assert response.status_code == 200, response.text
        served = pixels(response.json()["data"][0]["b64_json"])
        np.testing.assert_array_equal(served, direct(plus, [IMAGE_A, IMAGE_B], seed=4, **fields))
        assert not np.array_equal(served, default), f"{fields} made no difference"


def test_mask_keeps_the_first_image_outside_the_transparent_area(plus_server: BackgroundServer) -> None:
    base = noise(32, 32, 4)
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half editable
    response = httpx.post(f"{plus_server.url}/v1/images/edits", data={"prompt": PROMPT, **FAST, "seed": "1"},
                          files=[("image[]", ("a.png", png(base), "image/png")),
                                 ("mask", ("m.png", png(mask), "image/png"))], timeout=60)
    out = pixels(response.json()["data"][0]["b64_json"])
    np.testing.assert_array_equal(out[:, 16:], np.asarray(base)[:, 16:])
    assert not np.array_equal(out[:, :16], np.asarray(base)[:, :16])


@pytest.mark.parametrize("files, fields, needle", [
    ([("image[]", ("x.png", b"not an image", "image/png"))], {}, "not a valid image"),
    ([("image[]", (f"{i}.png", png(noise(16, 16, i)), "image/png")) for i in range(4)], {}, "at most 3"),
    ([("image[]", ("big.png", png(noise(400, 300, 0)), "image/png"))], {}, "limit of 200000 bytes"),
    ([("image[]", ("wide.png", png(Image.new("RGB", (400, 300))), "image/png"))], {}, "90000-pixel limit"),
    ([("image[]", ("a.png", png(IMAGE_A), "image/png"))], {"size": "30x32"}, "multiples of 8"),  # the tiny VAE: 4x, real: 8x
    ([("image[]", ("a.png", png(IMAGE_A), "image/png"))], {"size": "4096x4096"}, "limit of 4194304 pixels"),
    ([("image[]", ("a.png", png(IMAGE_A), "image/png")), ("mask", ("m.png", png(noise(8, 8, 0)), "image/png"))],
     {}, "mask is 8x8 but the first image is 40x32"),
    ([], {}, "needs at least 1 image"),
    ([("image[]", ("a.png", png(IMAGE_A), "image/png"))], {"n": "9"}, "limit of 4 images"),
    ([("image[]", ("a.png", png(IMAGE_A), "image/png"))], {"num_inference_steps": "1000"}, "limit of 100"),
    ([("image[]", ("a.png", png(IMAGE_A), "image/png"))], {"response_format": "url"}, "b64_json"),
    ([("image[]", ("a.png", png(IMAGE_A), "image/png"))], {"n": "two"}, "n:"),
])
def test_bad_input_is_a_400_naming_the_limit(plus_server: BackgroundServer, files: list, fields: dict,
                                             needle: str) -> None:
    response = httpx.post(f"{plus_server.url}/v1/images/edits", data={"prompt": PROMPT, **FAST, **fields},
                          files=files or None, timeout=30)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_openapi_declares_the_multipart_form(plus_server: BackgroundServer) -> None:
    spec = httpx.get(f"{plus_server.url}/openapi.json").json()
    content = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert list(content) == ["multipart/form-data"]
    assert "application/json" in spec["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]


def _start_long_stream(server: BackgroundServer, steps: int) -> tuple[httpx.Client, Any, dict]:
    client = httpx.Client(timeout=60)
    request = client.build_request("POST", f"{server.url}/v1/images/generations",
                                   json={"prompt": PROMPT, "size": "32x32", "num_inference_steps": steps,
                                         "seed": 1, "stream": True})
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    first = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
    return client, response, first


def test_disconnect_cancels_the_job_and_the_worker_moves_on(pipelines: dict[str, ImagePipeline]) -> None:
    steps = LONG_STEPS
    with serve(pipelines["generate"], image_limits=LONG_JOBS) as server:
        queue = server.server.config.app.state.qwenstack_images.queue
        client, response, first = _start_long_stream(server, steps)
        assert first["type"] == "image_generation.progress"
        started = time.monotonic()
        response.close()
        client.close()  # the client goes away after the first step
        short = httpx.post(f"{server.url}/v1/images/generations",
                           json={"prompt": PROMPT, "size": "32x32", "num_inference_steps": 2, "seed": 1}, timeout=60)
        assert short.status_code == 200
        done_at = time.monotonic()
        # The non-streamed flavour: a client that times out also cancels its job. Each of its steps waits
        # 50 ms (the queue's yield to chat, told chat is busy), so no machine finishes it inside the 1 s.
        queue.chat_busy, queue.yield_s = (lambda: True), 0.05
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/images/generations", timeout=1.0,
                       json={"prompt": PROMPT, "size": "32x32", "num_inference_steps": steps, "seed": 2})
        deadline = time.monotonic() + 10
        while queue.running is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        records = list(queue.history)
    cancelled, finished, timed_out = records[-3:]
    assert cancelled.status == "cancelled" and cancelled.steps_done < steps
    assert finished.status == "done"
    assert timed_out.status == "cancelled" and timed_out.steps_done < steps
    # Time per step from the finished job's run; the cancelled job would have needed `steps` of them.
    per_step = (finished.ended_at - finished.started_at) / 2
    assert done_at - started < steps * per_step, "the worker waited for the cancelled job"
    assert finished.started_at < cancelled.started_at + steps * per_step


def test_full_queue_is_a_429_with_retry_after(pipelines: dict[str, ImagePipeline]) -> None:
    with serve(pipelines["generate"], image_max_queued=1) as server:
        queue = server.server.config.app.state.qwenstack_images.queue
        # The worker's first job holds it until the test lets go, so the queue's state does not depend on how
        # fast this machine denoises.
        release = threading.Event()
        run_job = queue._runner
        queue._runner = lambda *args: (release.wait(60), run_job(*args))
        clients = [httpx.Client(timeout=60) for _ in range(2)]
        streams: list[httpx.Response] = []
        try:
            for client, wanted in zip(clients, (lambda: queue.running is not None, lambda: len(queue._waiting) == 1)):
                streams.append(client.send(client.build_request("POST", f"{server.url}/v1/images/generations",
                                                                json={**FAST, "prompt": PROMPT, "stream": True}),
                                           stream=True))
                deadline = time.monotonic() + 30
                while not wanted() and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert wanted()
            refused = httpx.post(f"{server.url}/v1/images/generations", timeout=30, json={**FAST, "prompt": PROMPT})
        finally:
            release.set()
            for stream, client in zip(streams, clients):
                stream.close()
                client.close()
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"


def test_image_model_loads_in_the_background_when_the_app_starts(dirs: dict[str, Path]) -> None:
    config = ServerConfig(enable_ui=False, image_model=str(dirs["generate"]), image_model_name="painter")
    with BackgroundServer(create_app([], config)) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, **FAST, "seed": 1})
            if response.status_code != 503:
                break
            assert response.json()["error"]["code"] == "loading" and "retry-after" in response.headers
            time.sleep(0.1)
        assert response.status_code == 200, response.text
        ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
        wrong = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, "model": "other"})
    assert ids == ["painter"]
    assert wrong.status_code == 404 and "'painter'" in wrong.json()["error"]["message"]
    with BackgroundServer(create_app([], ServerConfig(enable_ui=False))) as server:
        none = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT})
    assert none.status_code == 404 and "--image-model" in none.json()["error"]["message"]


def test_image_jobs_wait_between_steps_while_chat_is_busy(pipelines: dict[str, ImagePipeline]) -> None:
    from qwenstack.imagegen.jobs import ImageJob, run_job
    from qwenstack.imagegen.queue import ImageJobQueue

    calls = []
    run_job(pipelines["generate"], ImageJob(prompt=PROMPT, width=32, height=32, num_inference_steps=3),
            lambda event: None, between_steps=lambda: calls.append(1))
    assert len(calls) == 3  # the queue's hook runs after every denoising step

    answers = iter([True, True, True])
    queue = ImageJobQueue(pipelines["generate"], chat_busy=lambda: next(answers, False), yield_s=5.0)
    try:
        t = time.monotonic()
        queue._yield_to_chat()  # waits while chat is busy, and no longer
        released = time.monotonic() - t
        queue.chat_busy, queue.yield_s = (lambda: True), 0.2
        t = time.monotonic()
        queue._yield_to_chat()  # at most yield_s per step, however long chat stays busy
        capped = time.monotonic() - t
    finally:
        queue.close()
    assert released < 1.0 and 0.2 <= capped < 1.0


def test_serve_flags_build_the_image_config() -> None:
    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import serve_config_from_args, server_config

    parser = build_parser(discover_commands()[0])
    args = parser.parse_args(["serve", "--image-model", "/models/qwen-image-edit", "--image-offload", "model",
                              "--image-max-queued", "2"])
    config = server_config(serve_config_from_args(args))
    assert (config.image_model, config.image_offload, config.image_max_queued) == \
        ("/models/qwen-image-edit", "model", 2)
    with pytest.raises(ValueError, match="need --image-model"):
        serve_config_from_args(parser.parse_args(["serve", "--image-offload", "model"]))


def test_loading_refuses_other_pipelines(tmp_path: Path) -> None:
    from qwenstack.errors import ConfigError
    from qwenstack.imagegen.pipelines import read_class_name

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="QwenImageEditPlusPipeline"):
        read_class_name(tmp_path)


def test_loading_on_a_mocked_gpu_places_the_pipeline(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole loading path with torch.cuda mocked (no GPU here): the tiny checkpoint is loaded in bfloat16
    and handed to diffusers' model offload (free memory below its weights, above its biggest component's),
    which is recorded instead of run."""
    import diffusers

    from test_image_placement import fake_gpu

    directory = dirs["generate"]
    sizes = [sum(f.stat().st_size for f in d.rglob("*.safetensors")) for d in directory.iterdir() if d.is_dir()]
    free = int(1.25 * (max(sizes) + sum(sizes)) / 2)  # between the biggest component's and all weights' needs
    fake_gpu(monkeypatch, free)
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "enable_model_cpu_offload",
                        lambda self, device=None: calls.append(("model_offload", device)))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "to", lambda self, *a, **k: calls.append(("to", a)))
    pipeline = load_image_pipeline(str(directory), name="t2i")
    assert calls == [("model_offload", "cuda")] and pipeline.device == "cuda"
    assert pipeline.pipe.transformer.dtype == torch.bfloat16


def test_chat_is_answered_while_an_image_job_runs(pipelines: dict[str, ImagePipeline], tiny_qwen3: Path) -> None:
    """A chat model and an image model in one app: chat requests are answered while an image job runs, and
    the app's wiring tells the image worker that chat is busy (it then waits between denoising steps)."""
    from server_utils import tiny_served_model

    endless = 100_000  # steps: the job outlives the test, which ends it by going away
    app = create_app([tiny_served_model(tiny_qwen3, "chat")],
                     ServerConfig(enable_ui=False, image_limits=ImageRequestLimits(max_steps=endless)),
                     image_pipeline=pipelines["generate"])
    queue = app.state.qwenstack_images.queue
    wired = queue.chat_busy
    seen: list[bool] = []

    def watched() -> bool:
        seen.append(wired())
        return seen[-1]

    queue.chat_busy = watched
    with BackgroundServer(app) as server:
        chat = sdk(server).chat.completions

        def ask(i: int) -> Any:
            return chat.create(model="chat", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=32,
                               temperature=0, extra_body={"ignore_eos": True})

        ask(0)  # the engine's first request (kernel builds, warm-up) before any image job
        assert wired() is False  # chat idle again
        client = httpx.Client(timeout=60)
        response = client.send(client.build_request(
            "POST", f"{server.url}/v1/images/generations",
            json={"prompt": PROMPT, "size": "32x32", "num_inference_steps": endless, "stream": True}), stream=True)
        lines = response.iter_lines()  # kept open: closing it would close the stream and cancel the job
        try:
            assert json.loads(next(line for line in lines if line.startswith("data: "))[6:])["step"] == 1
            job = queue.running
            assert job is not None and True not in seen
            answers = [ask(i) for i in range(1, 4)]
            # A request may fall between two of the worker's looks: a few more until it has seen one, if needed.
            while True not in seen and len(answers) < 12:
                answers.append(ask(len(answers) + 1))
            during = job.record.steps_done
            assert queue.running is job and job.record.status == "running"
            deadline = time.monotonic() + 30
            while job.record.steps_done == during and time.monotonic() < deadline:
                time.sleep(0.02)
            assert job.record.steps_done > during, "the image job did not go on after chat"
        finally:
            response.close()
            client.close()
    assert {a.usage.completion_tokens for a in answers} == {32}
    assert True in seen and seen[-1] is False  # the worker saw chat busy, then idle again
