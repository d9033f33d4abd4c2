"""Where an image pipeline runs, decided without a GPU: `choose_offload` from a mocked `torch.cuda` (free
device memory -> resident, model offload or sequential offload, the same answer as the planner gives for the
real Qwen-Image-Edit-2509), and `load_image_pipeline`'s CUDA placement (bfloat16, `.to("cuda")` or diffusers'
offload hooks; the whole loading path is in test_images_server.py) with the moves recorded instead of made."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qwenstack.cost.image_planner import KNOWN_IMAGE_MODELS, find_gpu, plan_image
from qwenstack.errors import ConfigError
from qwenstack.imagegen.pipelines import Placement, choose_offload, choose_placement, place

GB = 10**9


def checkpoint(root: Path, sizes: dict[str, int]) -> Path:
    """A pipeline directory whose components' safetensors files have the given byte sizes (sparse files:
    nothing is written, only the sizes the offload rule reads)."""
    for component, size in sizes.items():
        (root / component).mkdir(parents=True)
        with open(root / component / "diffusion_pytorch_model.safetensors", "wb") as f:
            f.truncate(size)
    (root / "model_index.json").write_text('{"_class_name": "QwenImageEditPlusPipeline"}')
    return root


def fake_gpu(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> list[Any]:
    """torch.cuda says a GPU is there with `free_bytes` free; returns the devices it was asked about."""
    asked: list[Any] = []

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        asked.append(device)
        return free_bytes, 141 * GB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


@pytest.mark.parametrize("free_gb, mode", [
    (40, "none"),  # 29 GB of weights x 1.25 = 36.25 GB fit
    (36, "model"),  # they do not, but the biggest component (20 GB x 1.25) does
    (25, "model"),  # exactly 20 x 1.25
    (24, "sequential"),  # not even the transformer fits: layer by layer
])
def test_auto_offload_follows_free_gpu_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_gb: int,
                                              mode: str) -> None:
    model = checkpoint(tmp_path, {"transformer": 20 * GB, "text_encoder": 8 * GB, "vae": 1 * GB})
    asked = fake_gpu(monkeypatch, free_gb * GB)
    assert choose_offload(model, "cuda:1", "auto") == mode
    assert asked == [torch.device("cuda:1")]  # the free memory of the device it will run on


def test_explicit_offload_and_cpu_never_ask_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = checkpoint(tmp_path, {"transformer": 20 * GB})
    asked = fake_gpu(monkeypatch, 1 * GB)
    assert choose_offload(model, "cuda", "none") == "none"  # the owner's choice stands
    assert choose_offload(model, "cuda", "model") == "model"
    assert choose_offload(model, "cpu", "auto") == "none"
    assert asked == []
    with pytest.raises(ConfigError, match="auto, none, model, sequential"):
        choose_offload(model, "cuda", "layers")


@pytest.mark.parametrize("gpu", ["H200", "H100", "L40S", "RTX-4090"])
def test_server_and_planner_choose_the_same_offload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    gpu: str) -> None:
    """The real Qwen-Image-Edit-2509's bf16 weight bytes on a GPU with all its memory free."""
    model = KNOWN_IMAGE_MODELS["qwen/qwen-image-edit-2509"]
    checkpoint(tmp_path, {"transformer": model.transformer_params * 2, "text_encoder": model.text_encoder_params * 2,
                          "vae": model.vae_params * 2})
    spec = find_gpu(gpu)
    fake_gpu(monkeypatch, int(spec.memory_gib * 2**30))
    assert choose_offload(tmp_path, "cuda", "auto") == plan_image(model, spec).offload


def test_placement_on_a_machine_with_and_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = checkpoint(tmp_path, {"transformer": 20 * GB, "text_encoder": 8 * GB})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_placement(model) == Placement("cpu", torch.float32, "none")  # float32: bf16 is slow on CPUs
    fake_gpu(monkeypatch, 30 * GB)
    assert choose_placement(model) == Placement("cuda", torch.bfloat16, "model")
    assert choose_placement(model, dtype="float16", offload="none") == Placement("cuda", torch.float16, "none")
    assert choose_placement(model, device="cpu") == Placement("cpu", torch.float32, "none")


class RecordingPipe:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def to(self, device: str) -> None:
        self.calls.append(("to", device))

    def enable_model_cpu_offload(self, device: str) -> None:
        self.calls.append(("model_offload", device))

    def enable_sequential_cpu_offload(self, device: str) -> None:
        self.calls.append(("sequential_offload", device))


@pytest.mark.parametrize("offload, call", [("none", ("to", "cuda:0")), ("model", ("model_offload", "cuda:0")),
                                           ("sequential", ("sequential_offload", "cuda:0"))])
def test_place_moves_or_hooks_the_pipeline(offload: str, call: tuple[str, str]) -> None:
    pipe = RecordingPipe()
    place(pipe, Placement("cuda:0", torch.bfloat16, offload))
    assert pipe.calls == [call]
