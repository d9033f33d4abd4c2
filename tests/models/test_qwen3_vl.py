"""Qwen3-VL and Qwen3-VL-MoE against transformers 5.24 on tiny random checkpoints (CPU, float32): logits of
prompts with zero, one and two images of different sizes, M-RoPE positions, greedy decoding through the
engine, both fused-expert layouts, and the config and prompt checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vl_checkpoints import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, build_vl_checkpoint, image_prompt, load_hf_vl
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import CheckpointError, ConfigError, RequestError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.qwen3_vl import Qwen3VLArgs, Qwen3VLForConditionalGeneration
from qwenstack.models.registry import load_model
from qwenstack.multimodal.inputs import ImageInput, MultimodalBatch, MultimodalInputs


PATCH_DIM = 3 * 2 * 16 * 16
CASES = {"dense-tied": ("dense", True), "dense-untied": ("dense", False), "moe": ("moe", False)}


def make_images(grids: list[tuple[int, int, int]], seed: int = 0) -> list[ImageInput]:
    g = torch.Generator().manual_seed(seed)
    return [ImageInput.from_pixels(torch.randn(t * h * w, PATCH_DIM, generator=g), (t, h, w)) for t, h, w in grids]


IMAGES = make_images([(1, 4, 6), (1, 6, 4)])
PROMPTS = {  # name: (token ids, images)
    "text-only": ([5, 17, 33, 2, 101, 7, 8, 9, 10], []),
    "one-image": (image_prompt([[11, 12], [13, 14, 15]], [6]), IMAGES[:1]),
    # a tall and a wide image (different grids, so the text after each continues from a different place)
    "two-images": (image_prompt([[21], [22, 23], [24, 25, 26, 27]], [6, 6]), IMAGES[:2]),
}


class _Decoder:  # the engine only needs text for stop strings, which these tests do not use
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind, tie = CASES[request.param]
    return build_vl_checkpoint(tmp_path_factory.mktemp(request.param), kind, tie, seed=2)


@pytest.fixture(scope="module")
def models(checkpoint: Path):
    return load_model(checkpoint, dtype=torch.float32), load_hf_vl(checkpoint)


def hf_inputs(ids: list[int], images: list[ImageInput]) -> dict:
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == IMAGE_TOKEN_ID).int()}
    if images:
        inputs["pixel_values"] = torch.cat([im.pixel_values for im in images])
        inputs["image_grid_thw"] = torch.tensor([im.grid_thw for im in images])
    return inputs


def packed_logits(model: Qwen3VLForConditionalGeneration, prompts: list[tuple[list[int], list[ImageInput]]]):
    """One packed forward over several prompts, images injected through the engine's MultimodalBatch."""
    ids, positions, rows, embeds, deepstack, lens = [], [], [], [], [], []
    for prompt, images in prompts:
        plan = model.plan_multimodal(prompt, images)
        base = len(ids)
        for placement, encoded in zip(plan.placements, model.encode_images(images) if images else []):
            rows += range(base + placement.offset, base + placement.end)
            embeds.append(encoded.embeds)
            deepstack.append(encoded.deepstack)
        ids += prompt
        positions.append(plan.positions)
        lens.append(len(prompt))
    mm = MultimodalBatch(torch.tensor(rows), torch.cat(embeds), torch.cat(deepstack, dim=1)) if rows else None
    hidden = model.forward(torch.tensor(ids), torch.cat(positions, dim=1), AttentionBatch.for_prompts(lens), None,
                           multimodal=mm)
    return list(model.compute_logits(hidden).split(lens))


@torch.inference_mode()
def test_logits_match_transformers(models) -> None:
    ours, hf = models
    prompts = list(PROMPTS.values())
    for (ids, images), got in zip(prompts, packed_logits(ours, prompts)):
        want = hf(**hf_inputs(ids, images)).logits[0]
        assert want.std() > 0.5  # O(1) logits: 1e-4 is a real float32 check
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_rope_positions_match_get_rope_index(models) -> None:
    ours, hf = models
    for ids, images in PROMPTS.values():
        plan = ours.plan_multimodal(ids, images)
        inputs = hf_inputs(ids, images)
        if not images:
            assert torch.equal(plan.positions, torch.arange(len(ids)).expand(3, -1)) and plan.rope_delta == 0
            continue
        want, delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
        assert torch.equal(plan.positions, want[:, 0]) and plan.rope_delta == int(delta)
        assert plan.rope_delta < 0  # 6 tokens of a 2x3 merged grid advance the position by 3 only


@torch.inference_mode()
def test_greedy_tokens_match_transformers_generate(models, checkpoint: Path) -> None:
    ours, hf = models
    engine = LLMEngine(ours, _Decoder(), [], EngineConfig(block_size=4, kv_cache_memory=2**22))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    names = ["one-image", "two-images"]
    outs = engine.generate_all([PROMPTS[n][0] for n in names], [params] * 2,
                               [MultimodalInputs(PROMPTS[n][1]) for n in names])
    for name, out in zip(names, outs):
        ids, images = PROMPTS[name]
        want = hf.generate(**hf_inputs(ids, images), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want, name


def test_published_transposed_experts_load(tmp_path: Path) -> None:
    """transformers writes fused experts as [E, 2I, H]; the published checkpoints hold [E, H, 2I]."""
    saved = build_vl_checkpoint(tmp_path / "saved", "moe", tie=True, seed=3)
    published = tmp_path / "published"
    published.mkdir()
    tensors = load_file(str(saved / "model.safetensors"))
    experts = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts
    for key in experts:
        tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, str(published / "model.safetensors"))
    (published / "config.json").write_text((saved / "config.json").read_text())
    a, b = load_model(saved, dtype=torch.float32), load_model(published, dtype=torch.float32)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a.lm_head is None  # tied: no lm_head.weight on disk


def test_config_checks() -> None:
    config = json.loads(json.dumps({
        "model_type": "qwen3_vl", "image_token_id": IMAGE_TOKEN_ID, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "video_token_id": VIDEO_TOKEN_ID, "tie_word_embeddings": True,
        "text_config": {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
                        "max_position_embeddings": 1024,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3]}},
        "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "patch_size": 16,
                          "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64,
                          "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
    }))
    args = Qwen3VLArgs.from_dict(config)
    assert (args.vocab_size, args.max_position_embeddings, args.text.tie_word_embeddings) == (151936, 1024, True)
    assert args.text.rope.rope_theta == 5e6 and args.vision.deepstack_visual_indexes == [0]
    bad_section = json.loads(json.dumps(config))
    bad_section["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
    with pytest.raises(ConfigError, match="sum to head_dim / 2 = 8"):
        Qwen3VLArgs.from_dict(bad_section)
    del bad_section["text_config"]["rope_parameters"]["mrope_section"]
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen3VLArgs.from_dict(bad_section)
    with pytest.raises(ConfigError, match="out_hidden_size"):
        Qwen3VLArgs.from_dict({**config, "vision_config": {**config["vision_config"], "out_hidden_size": 32}})
    with pytest.raises(ConfigError, match="image_token_id"):
        Qwen3VLArgs.from_dict({k: v for k, v in config.items() if k != "image_token_id"})


def test_prompt_and_images_must_agree(models) -> None:
    ours, _ = models
    ids, images = PROMPTS["two-images"]
    with pytest.raises(RequestError, match="2 image placeholder run"):
        ours.plan_multimodal(ids, images[:1])
    with pytest.raises(RequestError, match="needs 6 placeholder tokens, the prompt has 4"):
        ours.plan_multimodal(image_prompt([[1], [2]], [4]), images[:1])
    with pytest.raises(RequestError, match="video"):
        ours.plan_multimodal([1, VIDEO_TOKEN_ID, 2], [])


def test_missing_vision_weights_are_named(tmp_path: Path, checkpoint: Path) -> None:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.visual.deepstack_merger_list.1.linear_fc2.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="deepstack_merger_list.1.linear_fc2.weight"):
        load_model(tmp_path)
