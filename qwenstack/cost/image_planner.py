"""What a Qwen-Image pipeline (Qwen-Image-Edit-2509, Qwen-Image-Edit, Qwen-Image) needs on a GPU, and how long
one image takes, from the models' known sizes (`qwenstack plan Qwen/Qwen-Image-Edit-2509 --gpu H100`).

Assumptions (each one a constant below, so a measurement can replace it):
- Sizes: the parameter counts are those of the diffusers and transformers modules built on the meta device
  from the published configs (tests/cost/test_image_planner.py rebuilds them): the MMDiT (60 dual-stream
  blocks, 24 heads x 128, text dim 3584) 20.43B, the Qwen2.5-VL-7B text encoder 8.29B (0.68B of it the
  vision tower), the VAE 0.127B; all in bfloat16 (2 bytes).
- Sequence: the output image is 1/16 per side in tokens (VAE 8x, then 2x2 patches); the Edit pipelines
  append every input image's latents at ~1024x1024 area (4,096 tokens each), and the text side holds the
  template and prompt (~128 tokens) plus ~188 vision tokens per input image (384x384 area / 28x28).
- FLOPs: per image token per block 2 x 12 d^2 (q, k, v, out and the 4d MLP of its stream) and attention
  4 T^2 d per block; true CFG runs the transformer twice per step. The VAE costs 6.76 MFLOP per pixel to
  encode and 10.85 to decode (torch's FLOP counter on the real VAE config). The text encoder 2 x 6.5B
  FLOPs per text token (its language model without embeddings) and 2 x 0.68B per vision patch.
- Speed: FLOPs at `MFU` of the GPU's dense bfloat16 peak (0.45 for the transformer's large GEMMs and
  flash attention, 0.3 for the VAE's convolutions). Offloading adds PCIe transfers: model offload moves
  each component to the GPU once per image, sequential offload streams the transformer's weights for
  every forward pass.
- Memory: weights + activations; activations are ~16 hidden-size tensors per token in the transformer
  (attention through SDPA never holds T x T) and ~12 full-resolution 96-channel tensors in the VAE decoder.
  The offload mode is the server's rule (qwenstack.imagegen.pipelines.choose_offload): everything resident
  if weights x 1.25 fit, else model offload if the biggest component x 1.25 fits, else sequential.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from qwenstack.imagegen.pipelines import ACTIVATION_HEADROOM

BYTES = 2  # bfloat16
MFU_TRANSFORMER = 0.45
MFU_VAE = 0.30
VAE_ENCODE_FLOPS_PER_PIXEL = 6.76e6
VAE_DECODE_FLOPS_PER_PIXEL = 10.85e6
CONDITION_AREA = 1024 * 1024  # where the Edit pipelines resize input images for the VAE
TEXT_TOKENS = 128
VISION_TOKENS_PER_IMAGE = 188
TEXT_LM_PARAMS = 6.5e9
VISION_PARAMS = 0.68e9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    pcie_gbs: float  # host <-> device, GB/s in practice


GPUS = {g.name.lower(): g for g in (
    GPU("H200", 141, 989, 50), GPU("H100", 80, 989, 50), GPU("A100-80GB", 80, 312, 25),
    GPU("A100-40GB", 40, 312, 25), GPU("L40S", 48, 362, 25), GPU("RTX-4090", 24, 165, 25),
    GPU("RTX-3090", 24, 71, 25), GPU("L4", 24, 121, 25),
)}


@dataclass(frozen=True)
class DiffusionModel:
    name: str
    task: str  # "edit" or "generate"
    transformer_params: int
    text_encoder_params: int
    vae_params: int
    layers: int = 60
    hidden: int = 3072
    max_input_images: int = 0
    steps: int = 40


_PARTS = dict(transformer_params=20_430_401_088, text_encoder_params=8_292_166_656, vae_params=126_892_531)
KNOWN_IMAGE_MODELS = {m.name.lower(): m for m in (
    DiffusionModel("Qwen/Qwen-Image-Edit-2509", "edit", max_input_images=3, **_PARTS),
    DiffusionModel("Qwen/Qwen-Image-Edit", "edit", max_input_images=1, **_PARTS),
    DiffusionModel("Qwen/Qwen-Image", "generate", steps=50, **_PARTS),
)}


def known_image_model(name: str) -> DiffusionModel | None:
    return KNOWN_IMAGE_MODELS.get(name.lower())


CLASS_TO_MODEL = {"QwenImageEditPlusPipeline": "qwen/qwen-image-edit-2509",
                  "QwenImageEditPipeline": "qwen/qwen-image-edit", "QwenImagePipeline": "qwen/qwen-image"}


def image_model_for(model: str) -> DiffusionModel | None:
    """A known name, or a local pipeline directory (its model_index.json names the pipeline class)."""
    import json
    from pathlib import Path

    known = known_image_model(model)
    if known is not None:
        return known
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    class_name = json.loads(index.read_text()).get("_class_name")
    return KNOWN_IMAGE_MODELS.get(CLASS_TO_MODEL.get(class_name, ""))


def local_gpu() -> GPU | None:
    """The table's entry for this machine's first CUDA device, matched by name."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return next((g for key, g in sorted(GPUS.items(), key=lambda kv: -len(kv[0])) if key in name), None)


def find_gpu(name: str) -> GPU:
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS.values())}")
    return gpu


@dataclass
class ImagePlan:
    model: str
    gpu: str
    width: int
    height: int
    input_images: int
    steps: int
    true_cfg: bool
    weights_gb: float
    transformer_gb: float
    offload: str
    peak_memory_gb: float
    sequence_tokens: int
    tflops_per_image: float
    seconds_per_image: float
    seconds_breakdown: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds_breakdown.items())
        cfg = "true CFG (2 passes per step)" if self.true_cfg else "no CFG"
        inputs = f", {self.input_images} input image(s)" if self.input_images else ""
        return "\n".join([
            f"{self.model} on {self.gpu}: {self.width}x{self.height}{inputs}, {self.steps} steps, {cfg}",
            f"  weights (bfloat16): {self.weights_gb:.1f} GB (transformer {self.transformer_gb:.1f} GB)",
            f"  offload: {self.offload}; peak GPU memory ~{self.peak_memory_gb:.1f} GB",
            f"  transformer sequence: {self.sequence_tokens} tokens; {self.tflops_per_image:,.0f} TFLOP per image",
            f"  time per image: ~{self.seconds_per_image:.0f} s ({parts})",
            "  (estimates from known sizes and assumed efficiency: see qwenstack/cost/image_planner.py)",
        ])


def plan_image(model: DiffusionModel, gpu: GPU, width: int = 1024, height: int = 1024, input_images: int | None = None,
               steps: int | None = None, true_cfg: bool = True) -> ImagePlan:
    inputs = (1 if model.task == "edit" else 0) if input_images is None else input_images
    if model.task == "generate":
        inputs = 0
    elif not 1 <= inputs <= model.max_input_images:
        raise ValueError(f"{model.name} takes 1 to {model.max_input_images} input images, got {inputs}")
    steps = steps or model.steps
    passes = 2 if true_cfg else 1
    image_tokens = (width // 16) * (height // 16)
    condition_tokens = inputs * CONDITION_AREA // 256
    text_tokens = TEXT_TOKENS + VISION_TOKENS_PER_IMAGE * inputs
    seq = image_tokens + condition_tokens + text_tokens
    d, layers = model.hidden, model.layers
    forward_flops = layers * (2 * 12 * d * d * seq + 4 * seq * seq * d)
    transformer_flops = forward_flops * passes * steps
    text_flops = passes * (2 * TEXT_LM_PARAMS * text_tokens + 2 * VISION_PARAMS * 4 * VISION_TOKENS_PER_IMAGE * inputs)
    vae_flops = VAE_ENCODE_FLOPS_PER_PIXEL * CONDITION_AREA * inputs + VAE_DECODE_FLOPS_PER_PIXEL * width * height
    peak = gpu.bf16_tflops * 1e12
    seconds = {"text encoder": text_flops / (peak * MFU_TRANSFORMER),
               "denoising": transformer_flops / (peak * MFU_TRANSFORMER),
               "VAE": vae_flops / (peak * MFU_VAE)}

    sizes = {"transformer": model.transformer_params * BYTES, "text encoder": model.text_encoder_params * BYTES,
             "VAE": model.vae_params * BYTES}
    weights = sum(sizes.values())
    memory = gpu.memory_gib * 2**30
    transformer_act = seq * d * 16 * BYTES
    vae_act = width * height * 96 * 12 * BYTES
    activations = max(transformer_act, vae_act)
    if weights * ACTIVATION_HEADROOM <= memory:
        offload, resident = "none", weights
    elif max(sizes.values()) * ACTIVATION_HEADROOM <= memory:
        offload, resident = "model", max(sizes.values())
        seconds["PCIe (model offload)"] = weights / (gpu.pcie_gbs * 1e9)
    else:
        offload, resident = "sequential", sizes["transformer"] / layers * 2  # a block or two on the GPU at a time
        streamed = sizes["transformer"] * passes * steps + sizes["text encoder"] * passes + sizes["VAE"]
        seconds["PCIe (sequential offload)"] = streamed / (gpu.pcie_gbs * 1e9)
    return ImagePlan(model.name, gpu.name, width, height, inputs, steps, true_cfg, weights / 1e9,
                     sizes["transformer"] / 1e9, offload, (resident + activations) / 1e9, seq,
                     (transformer_flops + text_flops + vae_flops) / 1e12, sum(seconds.values()), seconds)
