"""`qwenstack plan` for the Qwen-Image pipelines: the sizes it assumes are those of the real modules (built
on the meta device from the published configs), its VAE cost is torch's FLOP count, and its answers follow
the server's offload rule on GPUs of different sizes."""
from __future__ import annotations

import json

import pytest
import torch

from qwenstack.cli import main
from qwenstack.cost.image_planner import (
    GPUS, KNOWN_IMAGE_MODELS, VAE_DECODE_FLOPS_PER_PIXEL, VAE_ENCODE_FLOPS_PER_PIXEL, find_gpu, image_model_for,
    plan_image,
)

EDIT_2509 = KNOWN_IMAGE_MODELS["qwen/qwen-image-edit-2509"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ~8 s under load on two shared cores (building the modules on meta and counting the VAE's FLOPs), plus
# importing diffusers and transformers, which the other image tests of a run import anyway.
def test_sizes_are_those_of_the_published_configs() -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        # transformer/config.json and vae/config.json of Qwen/Qwen-Image-Edit-2509 (diffusers' defaults)
        transformer = QwenImageTransformer2DModel(num_layers=60, attention_head_dim=128, num_attention_heads=24,
                                                  joint_attention_dim=3584, in_channels=64, out_channels=16)
        vae = AutoencoderKLQwenImage()
        # text_encoder/config.json: Qwen2.5-VL-7B-Instruct
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064,
                             rope_scaling=dict(mrope_section=[16, 24, 24], rope_type="default", type="default")),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
            vocab_size=152064, tie_word_embeddings=False))
        assert _count(transformer) == EDIT_2509.transformer_params
        assert _count(text_encoder) == EDIT_2509.text_encoder_params
        assert _count(vae) == EDIT_2509.vae_params

        from torch.utils.flop_counter import FlopCounterMode

        side = 128
        with FlopCounterMode(display=False) as counter:
            latents = vae.encode(torch.zeros(1, 3, 1, side, side)).latent_dist.mode()
        assert counter.get_total_flops() / side**2 == pytest.approx(VAE_ENCODE_FLOPS_PER_PIXEL, rel=0.05)
        with FlopCounterMode(display=False) as counter:
            vae.decode(latents)
        assert counter.get_total_flops() / side**2 == pytest.approx(VAE_DECODE_FLOPS_PER_PIXEL, rel=0.05)


def test_offload_follows_the_gpu_size() -> None:
    modes = {name: plan_image(EDIT_2509, find_gpu(name)).offload for name in ("H200", "H100", "L40S", "RTX-4090")}
    assert modes == {"H200": "none", "H100": "none", "L40S": "model", "RTX-4090": "sequential"}
    h100 = plan_image(EDIT_2509, find_gpu("H100"))
    assert 57 < h100.weights_gb < 58.5 and h100.peak_memory_gb < GPUS["h100"].memory_gib * 2**30 / 1e9
    assert h100.sequence_tokens == 64 * 64 * 2 + 128 + 188
    assert 10 < h100.seconds_per_image < 120
    slower = plan_image(EDIT_2509, find_gpu("RTX-4090"))
    assert slower.seconds_per_image > 3 * h100.seconds_per_image


def test_more_inputs_cost_more_and_no_cfg_halves_the_denoising() -> None:
    gpu = find_gpu("H100")
    one, three = plan_image(EDIT_2509, gpu, input_images=1), plan_image(EDIT_2509, gpu, input_images=3)
    assert three.seconds_per_image > 1.5 * one.seconds_per_image
    no_cfg = plan_image(EDIT_2509, gpu, true_cfg=False)
    assert no_cfg.seconds_breakdown["denoising"] == pytest.approx(one.seconds_breakdown["denoising"] / 2)
    with pytest.raises(ValueError, match="1 to 3 input images"):
        plan_image(EDIT_2509, gpu, input_images=4)


def test_plan_command_answers_for_an_image_model(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "Qwen/Qwen-Image-Edit-2509", "--gpu", "L40S", "--images", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "offload: model" in text and "time per image" in text
    assert json.loads(out.read_text())["input_images"] == 2
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    assert image_model_for(str(tmp_path)).name == "Qwen/Qwen-Image"
    assert main(["plan", "Qwen/Qwen-Image", "--gpu", "TPU"]) == 1
    assert "unknown GPU" in capsys.readouterr().err
