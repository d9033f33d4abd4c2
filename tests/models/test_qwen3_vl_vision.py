"""Qwen3-VL vision tower and image preprocessing against transformers 5.24 on a tiny random config (CPU)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwenstack.errors import ConfigError
from qwenstack.models.qwen3_vl_vision import Qwen3VLVisionModel, VisionArgs
from qwenstack.multimodal.image_processing import (
    ImageError,
    ImageLimits,
    ImageProcessor,
    ImageProcessorConfig,
    decode_data_url,
    load_image,
    load_image_data_url,
    smart_resize,
)

import transformers  # noqa: E402  (a required test dependency: missing, the parity tests fail)

VISION_CONFIG = {
    "model_type": "qwen3_vl",  # released checkpoints carry this (wrong) type; it must be ignored
    "depth": 3,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,  # an 8x8 table: grids both smaller and larger than it get resampled
    "deepstack_visual_indexes": [0, 1],
    "in_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "initializer_range": 0.02,
}
TEXT_CONFIG = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True},
}
PATCH_DIM = 3 * 2 * 16 * 16
TOL = 1e-5


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, Qwen3VLVisionModel]:
    """transformers' vision tower and ours, holding the same weights."""
    config = transformers.Qwen3VLConfig(
        vision_config={k: v for k, v in VISION_CONFIG.items() if k != "model_type"}, text_config=TEXT_CONFIG
    )
    torch.manual_seed(0)
    hf = transformers.Qwen3VLForConditionalGeneration(config).eval()
    # transformers initialises biases to 0 and norms to 1 with 0.02-std weights, so activations would be
    # tiny and a 1e-5 tolerance meaningless. Give every vision parameter O(1)-scale random values instead.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf.model.visual.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias") or name == "pos_embed.weight":
                param.copy_(0.2 * noise if name.endswith("bias") else noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in**0.5)

    ours = Qwen3VLVisionModel(VisionArgs.from_dict(VISION_CONFIG)).eval()
    prefix = "model.visual."
    checkpoint = {k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    ours.load_state_dict(checkpoint, strict=True)  # identity name mapping
    return hf.model.visual, ours


def _run_both(models, grid_thw: list[list[int]]):
    hf, ours = models
    grid = torch.tensor(grid_thw, dtype=torch.int64)
    num_patches = int(grid.prod(-1).sum())
    pixel_values = torch.randn(num_patches, PATCH_DIM, generator=torch.Generator().manual_seed(num_patches))
    with torch.no_grad():
        reference = hf(pixel_values, grid_thw=grid, return_dict=True)
        embeds, deepstack = ours(pixel_values, grid)
    return reference, embeds, deepstack, pixel_values, grid


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_checkpoint_names_and_shapes_are_identity(models) -> None:
    hf, ours = models
    theirs = {k: v.shape for k, v in hf.state_dict().items()}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert mine == theirs


@pytest.mark.parametrize(
    "grid_thw",
    [
        [[1, 4, 6]],  # one image, grid smaller than the 8x8 position table
        [[1, 4, 6], [1, 10, 12]],  # two images of different sizes in one call (second one upsamples the table)
        [[2, 6, 4], [1, 2, 2]],  # two frames of one clip (separate attention segments) plus a one-block image
    ],
    ids=["one-image", "two-images", "frames"],
)
def test_vision_tower_matches_transformers(models, grid_thw: list[list[int]]) -> None:
    reference, embeds, deepstack, _, _ = _run_both(models, grid_thw)
    expected_rows = sum(t * h * w for t, h, w in grid_thw) // 4
    assert embeds.shape == (expected_rows, VISION_CONFIG["out_hidden_size"])
    # Guard the tolerance: with O(1) outputs, 1e-5 is a real float32 check.
    assert reference.pooler_output.std() > 0.1
    assert _max_diff(embeds, reference.pooler_output) < TOL
    assert len(deepstack) == len(reference.deepstack_features) == len(VISION_CONFIG["deepstack_visual_indexes"])
    for k, (mine, theirs) in enumerate(zip(deepstack, reference.deepstack_features)):
        assert theirs.std() > 0.1
        assert _max_diff(mine, theirs) < TOL, f"deepstack feature {k}"


def test_images_do_not_attend_to_each_other(models) -> None:
    """The first image's outputs are the same alone as next to a second image."""
    _, ours = models
    _, together, together_deep, pixel_values, _ = _run_both(models, [[1, 4, 6], [1, 10, 12]])
    with torch.no_grad():
        alone, alone_deep = ours(pixel_values[:24], torch.tensor([[1, 4, 6]]))
    assert _max_diff(together[:6], alone) < TOL
    for mine, single in zip(together_deep, alone_deep):
        assert _max_diff(mine[:6], single) < TOL


def test_bfloat16_forward_keeps_dtype(models) -> None:
    _, ours = models
    model = Qwen3VLVisionModel(ours.args)
    model.load_state_dict(ours.state_dict())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        embeds, deepstack = model(torch.randn(24, PATCH_DIM), torch.tensor([[1, 4, 6]]))
    assert embeds.dtype == torch.bfloat16 and embeds.shape == (6, 64)
    assert all(d.dtype == torch.bfloat16 for d in deepstack)


def test_bad_grid_is_rejected(models) -> None:
    _, ours = models
    with pytest.raises(ValueError, match="patches"):
        ours(torch.randn(20, PATCH_DIM), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="multiples"):
        ours(torch.randn(15, PATCH_DIM), torch.tensor([[1, 3, 5]]))


def test_vision_args_from_config_dict() -> None:
    args = VisionArgs.from_dict({**VISION_CONFIG, "some_future_field": 1})
    assert args.head_dim == 16 and args.num_grid_per_side == 8 and args.rope_theta == 10000.0
    incomplete = {k: v for k, v in VISION_CONFIG.items() if k != "out_hidden_size"}
    with pytest.raises(ConfigError, match="'out_hidden_size'"):
        VisionArgs.from_dict(incomplete)
    with pytest.raises(ConfigError, match="square"):
        VisionArgs.from_dict({**VISION_CONFIG, "num_position_embeddings": 60})


# --- preprocessing -------------------------------------------------------------------------------------

PREPROCESSOR_CONFIG = {  # Qwen3-VL's preprocessor_config.json layout, with a small pixel budget
    "size": {"shortest_edge": 32 * 32 * 2, "longest_edge": 128 * 128},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    # Per-channel values unlike Qwen3-VL's [0.5]*3, so a channel-order mistake shows.
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def _test_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)

    def noise(width: int, height: int, channels: int) -> np.ndarray:
        shape = (height, width, channels) if channels > 1 else (height, width)
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    palette = Image.fromarray(noise(31, 45, 1)).convert("P")
    palette.info["transparency"] = 7
    return {
        "rgb-37x53": Image.fromarray(noise(37, 53, 3), "RGB"),
        "rgb-300x17": Image.fromarray(noise(300, 17, 3), "RGB"),  # wide: h rounds up to one block
        "rgb-640x480": Image.fromarray(noise(640, 480, 3), "RGB"),  # over max_pixels: scaled down
        "rgb-12x10": Image.fromarray(noise(12, 10, 3), "RGB"),  # under min_pixels: scaled up
        "rgb-112x80": Image.fromarray(noise(112, 80, 3), "RGB"),  # 80/32 = 2.5 rounds half to even
        "rgba-45x70": Image.fromarray(noise(45, 70, 4), "RGBA"),  # composited onto white
        "gray-64x33": Image.fromarray(noise(64, 33, 1), "L"),
        "gray-alpha-50x50": Image.fromarray(noise(50, 50, 2), "LA"),
        "palette-transparent-31x45": palette,
    }


TEST_IMAGES = _test_images()


@pytest.fixture(scope="module")
def processors():
    hf = transformers.Qwen2VLImageProcessorPil(
        **{k: v for k, v in PREPROCESSOR_CONFIG.items() if k not in ("processor_class", "image_processor_type")}
    )
    return hf, ImageProcessor(ImageProcessorConfig.from_dict(PREPROCESSOR_CONFIG))


@pytest.mark.parametrize("name", list(TEST_IMAGES))
def test_preprocessing_matches_transformers(processors, name: str) -> None:
    hf, ours = processors
    image = TEST_IMAGES[name]
    expected = hf(images=[image.copy()], return_tensors="np")
    result = ours([image])
    assert result.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert result.pixel_values.dtype == torch.float32
    assert _max_diff(result.pixel_values, torch.from_numpy(expected["pixel_values"])) < TOL
    t, h, w = result.grid_thw[0].tolist()
    assert result.num_image_tokens == [t * h * w // 4]
    assert ours.num_image_tokens(image.height, image.width) == result.num_image_tokens[0]


def test_preprocessing_batch_matches_transformers(processors) -> None:
    hf, ours = processors
    images = list(TEST_IMAGES.values())
    expected = hf(images=[im.copy() for im in images], return_tensors="np")
    result = ours(images)
    assert result.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert _max_diff(result.pixel_values, torch.from_numpy(expected["pixel_values"])) < TOL
    assert sum(result.num_image_tokens) * 4 == result.pixel_values.shape[0]


def test_smart_resize_rule() -> None:
    assert smart_resize(80, 112, 32, 2048, 16384) == (64, 128)  # round(2.5) == 2
    assert smart_resize(10, 12, 32, 2048, 16384) == (64, 64)
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(10, 2010, 32, 2048, 16384)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_data_url_round_trip(processors) -> None:
    _, ours = processors
    image = TEST_IMAGES["rgba-45x70"]
    url = "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()
    decoded = load_image_data_url(url)
    assert decoded.size == image.size and decoded.mode == "RGBA"
    assert torch.equal(ours([decoded]).pixel_values, ours([image]).pixel_values)
    assert torch.equal(ours([_png_bytes(image)]).pixel_values, ours([image]).pixel_values)


def test_data_url_scheme_in_any_case() -> None:
    """RFC 3986 schemes are case-insensitive: the server routed `DATA:` as a data URL, then refused it."""
    png = _png_bytes(TEST_IMAGES["rgb-37x53"])
    payload = base64.b64encode(png).decode()
    assert decode_data_url("DATA:IMAGE/PNG;BASE64," + payload) == png
    assert decode_data_url("Data:video/mp4;base64," + payload, kind="video") == png


def test_data_url_in_the_url_safe_alphabet() -> None:
    """base64url (`-_` for `+/`, padding often stripped), as JavaScript and JWT-style encoders write it."""
    data = bytes(range(256)) * 2  # every 6-bit value, so both alphabets' last two characters occur
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert "-" in urlsafe and "_" in urlsafe
    assert decode_data_url("data:image/png;base64," + urlsafe) == data
    assert decode_data_url("data:image/png;base64," + urlsafe.rstrip("=")) == data
    mixed = base64.b64encode(data).decode().replace("/", "_", 1)  # one character of each alphabet
    with pytest.raises(ImageError, match="not valid base64"):
        decode_data_url("data:image/png;base64," + mixed)


@pytest.mark.parametrize(
    "url, message",
    [
        ("https://example.com/a.png", "data: URL"),
        ("data:text/plain;base64,aGVsbG8=", "image/"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64,!!!notbase64", "base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "supported format"),
    ],
)
def test_bad_data_urls_raise_image_error(url: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        load_image_data_url(url)
    assert isinstance(info.value, ValueError)


def test_limits_and_corrupt_images() -> None:
    png = _png_bytes(TEST_IMAGES["rgb-640x480"])
    with pytest.raises(ImageError, match="byte limit"):
        load_image(png, ImageLimits(max_bytes=1000))
    with pytest.raises(ImageError, match="byte limit"):
        decode_data_url("data:image/png;base64," + base64.b64encode(png).decode(), max_bytes=1000)
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(png, ImageLimits(max_pixels=640 * 480 - 1))
    with pytest.raises(ImageError, match="corrupt|supported format"):
        load_image(png[: len(png) // 2])  # truncated
    tiff = io.BytesIO()
    TEST_IMAGES["rgb-37x53"].save(tiff, format="TIFF")
    with pytest.raises(ImageError, match="supported format"):
        load_image(tiff.getvalue())


def test_preprocessor_config_missing_field() -> None:
    config = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k != "patch_size"}
    with pytest.raises(ConfigError, match="'patch_size'"):
        ImageProcessorConfig.from_dict(config)
    legacy = {**config, "patch_size": 14, "min_pixels": 3136, "max_pixels": 12845056}  # Qwen2-VL style keys
    parsed = ImageProcessorConfig.from_dict(legacy)
    assert (parsed.min_pixels, parsed.max_pixels, parsed.factor) == (3136, 12845056, 28)


def test_processor_config_as_transformers_5_saves_it(tmp_path) -> None:
    """transformers 5's processor.save_pretrained writes every sub-processor into processor_config.json and no
    preprocessor_config.json (a fine-tune saved so could not be served), and reads that file first."""
    import json

    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from qwenstack.multimodal.video_processing import VideoProcessorConfig

    image = transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=200_000, patch_size=14)
    video = Qwen3VLVideoProcessor(fps=1, max_frames=32, size={"shortest_edge": 4096, "longest_edge": 300_000})
    saved = {"image_processor": image.to_dict(), "video_processor": video.to_dict(), "processor_class": "Qwen3VLProcessor"}
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    parsed = ImageProcessorConfig.from_pretrained(tmp_path)
    assert (parsed.min_pixels, parsed.max_pixels, parsed.patch_size) == (3136, 200_000, 14)
    frames = VideoProcessorConfig.from_pretrained(tmp_path)
    assert (frames.fps, frames.max_frames, frames.image.max_pixels, frames.image.patch_size) == (1, 32, 300_000, 16)
    # transformers reads the nested settings before a stale file of the older layout
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    assert ImageProcessorConfig.from_pretrained(tmp_path) == parsed
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    assert ImageProcessorConfig.from_pretrained(tmp_path) == ImageProcessorConfig.from_dict(PREPROCESSOR_CONFIG)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="no preprocessor_config.json .*nor 'image_processor' in a processor_config"):
        ImageProcessorConfig.from_pretrained(tmp_path)
