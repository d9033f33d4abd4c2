"""The Qwen3-VL vision tower's CPU fast path (bfloat16: oneDNN-packed linears with the GELUs fused, rotary on
q and k together, equal-length attention segments batched) against its plain PyTorch path; the plain path
itself is checked against transformers in test_qwen3_vl_vision.py."""
from __future__ import annotations

import pytest
import torch

from kernel_utils import bf16_kernel_level, count_segment_attention
from vl_checkpoints import IMAGE_TOKEN_ID, TEXT_CONFIG, VISION_CONFIG, VISION_END_ID, VISION_START_ID
from qwenstack.models import fast_paths
from qwenstack.models.cpu_linear import PackedLinear, packing_supported, prepare_cpu_linears
from qwenstack.models.qwen3_vl_vision import Qwen3VLVisionModel, VisionArgs, apply_vision_rotary, equal_length_runs
from qwenstack.models.qwen3_vl import Qwen3VLArgs, Qwen3VLForConditionalGeneration
from qwenstack.multimodal.inputs import ImageInput

PATCH_DIM = 3 * 2 * 16 * 16
# one image, two frames of a clip (one batched attention call) and a one-block image
GRIDS = [[1, 4, 6], [2, 6, 4], [1, 2, 2]]


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' form: full-width tables, x * cos + rotate_half(x) * sin in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    full_cos, full_sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    return (xf * full_cos + torch.cat((-x2, x1), -1) * full_sin).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_rotate_half(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(50, 3, 4, 16, generator=g).to(dtype)
    angles = torch.rand(50, 8, generator=g) * 40
    qk = qkv[:, :2].flatten(1, 2)  # the strided view the attention passes
    got = apply_vision_rotary(qk, angles.cos(), angles.sin())
    want = rotate_half_reference(qk, angles.cos(), angles.sin())
    assert got.dtype == dtype and got.shape == qk.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    else:  # float32 math rounded once: at most one bfloat16 step apart where fused multiply-adds round differently
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()


def test_equal_length_runs() -> None:
    assert equal_length_runs([4, 4, 4, 9, 4]) == [(0, 4, 3), (12, 9, 1), (21, 4, 1)]
    assert equal_length_runs([]) == []


def random_tower(seed: int = 3) -> Qwen3VLVisionModel:
    """A float32 tower with O(1)-scale weights (as the parity tests use), so bfloat16 errors are visible."""
    model = Qwen3VLVisionModel(VisionArgs.from_dict(dict(VISION_CONFIG))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias") or name == "pos_embed.weight":
                p.copy_(0.2 * noise if name.endswith("bias") else noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


@torch.inference_mode()
def test_prepared_bfloat16_tower_is_as_close_to_float32_as_the_plain_one() -> None:
    assert packing_supported()  # oneDNN ships with every x86 CPU build of torch
    reference = random_tower()
    plain = random_tower().to(torch.bfloat16)
    prepared = random_tower().to(torch.bfloat16)
    depth, mergers = len(plain.blocks), 1 + len(plain.deepstack_merger_list)
    assert prepared.prepare_for_cpu("native") == 4 * depth + 2 * mergers
    assert all(isinstance(m, PackedLinear) for b in prepared.blocks for m in (b.attn.qkv, b.mlp.linear_fc1))
    assert not any(type(m) is torch.nn.Linear for m in prepared.modules())
    assert random_tower().prepare_for_cpu("native") == 0  # float32 keeps the plain path

    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(1))
    want, want_deep = reference(pixels, grid)
    fast, fast_deep = prepared(pixels, grid)
    slow, slow_deep = plain(pixels, grid)
    for f, s, w in zip([fast, *fast_deep], [slow, *slow_deep], [want, *want_deep]):
        assert f.shape == w.shape and f.dtype == torch.bfloat16
        plain_error = relative_error(s, w)
        assert 0 < plain_error < 0.05  # bfloat16 rounding, not a wrong result
        # The fused GELU rounds once where the plain path rounds twice: no worse than the plain path.
        assert relative_error(f, w) < 1.5 * plain_error


@torch.inference_mode()
def test_prepared_tower_attention_takes_the_window_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """fast_paths.prepare_for_cpu swaps every block's window attention for the native kernel (one call a block,
    the frames as segments); in bfloat16 the outputs stay as close to float32 as the plain path's."""
    reference = random_tower()
    plain = random_tower().to(torch.bfloat16)
    prepared = random_tower().to(torch.bfloat16)
    assert fast_paths.prepare_for_cpu(prepared, linears=False).window_attention_layers == len(prepared.blocks)
    calls = count_segment_attention(monkeypatch)
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(1))
    want, _ = reference(pixels, grid)
    fast, _ = prepared(pixels, grid)
    slow, _ = plain(pixels, grid)
    assert calls == [[0, 24, 48, 72, 76]] * len(prepared.blocks)  # one segment per frame
    if bf16_kernel_level():  # elsewhere the kernel answers None: SDPA
        assert relative_error(fast, want) < 1.5 * relative_error(slow, want)


@torch.inference_mode()
def test_runner_preparation_packs_the_tower_and_keeps_its_outputs() -> None:
    config = {"model_type": "qwen3_vl", "image_token_id": IMAGE_TOKEN_ID, "vision_start_token_id": VISION_START_ID,
              "vision_end_token_id": VISION_END_ID, "tie_word_embeddings": True,
              "text_config": {**TEXT_CONFIG, "vocab_size": 512}, "vision_config": dict(VISION_CONFIG)}
    model = Qwen3VLForConditionalGeneration(Qwen3VLArgs.from_dict(config)).eval()
    model.model.visual = random_tower()
    model = model.to(torch.bfloat16)
    images = [ImageInput.from_pixels(torch.randn(t * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(2)),
                                     (t, h, w)) for t, h, w in GRIDS]
    before = model.encode_images(images)
    prepare_cpu_linears(model, form="packed")
    visual = model.model.visual
    # The tower's own preparation ran (the GELUs are fused), not the decoder's generic one.
    assert isinstance(visual.blocks[0].attn.qkv, PackedLinear) and visual.blocks[0].mlp.fc1_applies_gelu
    assert visual.merger.fc1_applies_gelu
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, PackedLinear)
    after = model.encode_images(images)
    for old, new in zip(before, after):
        for a, b in ((old.embeds, new.embeds), (old.deepstack, new.deepstack)):
            assert a.shape == b.shape
            assert relative_error(b, a.float()) < 0.02
