"""Qwen3-ASR against transformers 5.24 on tiny random checkpoints (CPU, float32), in both published layouts:
audio-encoder outputs, logits and greedy tokens for clips of 0.5 s to 40 s (several attention windows: the
tiny config's window is 2 s), audio and text requests batched together in the engine, and the checks."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kernel_utils import bf16_kernel_level, count_segment_attention
from asr_checkpoints import (
    AUDIO_END_ID, AUDIO_START_ID, AUDIO_TOKEN_ID, build_asr_checkpoint, hf_features, load_hf_asr, speechlike,
)
from qwenstack.audio.features import log_mel
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import CheckpointError, ConfigError, RequestError
from qwenstack.models import fast_paths
from qwenstack.models.attention import AttentionBatch, window_attention
from qwenstack.models.qwen3_asr import Qwen3ASRArgs, Qwen3ASRForConditionalGeneration
from qwenstack.models.qwen3_asr_audio import audio_token_count
from qwenstack.models.registry import load_model
from qwenstack.multimodal.inputs import AudioInput, MultimodalBatch, MultimodalInputs


CLIPS = {"0.5s": 0.5, "0.3s-padded": 0.3, "2.37s": 2.37, "6.1s-3-windows": 6.1}
LAYOUTS = {"hf-tied": ("hf", True), "thinker-untied": ("thinker", False)}


class _Decoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    layout, tie = LAYOUTS[request.param]
    base = tmp_path_factory.mktemp(request.param)
    # the same random weights saved twice: transformers reads its own layout, we read the one under test
    reference = build_asr_checkpoint(base / "hf", tie=tie, seed=4, with_tokenizer=False)
    tested = reference if layout == "hf" else build_asr_checkpoint(base / layout, tie=tie, seed=4, layout=layout,
                                                                    with_tokenizer=False)
    return load_model(tested, dtype=torch.float32), load_hf_asr(reference)


def clip(seconds: float, seed: int = 0) -> tuple[np.ndarray, AudioInput]:
    samples = speechlike(seconds, seed=seed)
    return samples, AudioInput.from_features(log_mel(samples), seconds)


def asr_prompt(n: int, tail: list[int] = (77, 78)) -> list[int]:  # type: ignore[assignment]
    return [151644, 9, 10, AUDIO_START_ID] + [AUDIO_TOKEN_ID] * n + [AUDIO_END_ID, 11, *tail]


def hf_inputs(ids: list[int], samples: np.ndarray | None) -> dict:
    inputs = {"input_ids": torch.tensor([ids])}
    if samples is not None:
        inputs["input_features"], inputs["input_features_mask"] = hf_features(samples)
    return inputs


@torch.inference_mode()
@pytest.mark.parametrize("name", sorted(CLIPS))
def test_encoder_and_logits_match_transformers(models, name: str) -> None:
    ours, hf = models
    samples, audio = clip(CLIPS[name], seed=len(name))
    features, mask = hf_features(samples)
    want_rows = hf.model.get_audio_features(features, mask).pooler_output
    got_rows = ours.encode_audio([audio])[0].embeds
    assert got_rows.shape[0] == ours.audio_tokens(audio) == audio_token_count(int(mask.sum()))
    torch.testing.assert_close(got_rows, want_rows, atol=1e-5, rtol=1e-5)
    ids = asr_prompt(got_rows.shape[0])
    plan = ours.plan_multimodal(ids, [], [audio])
    rows = torch.arange(plan.placements[0].offset, plan.placements[0].end)
    hidden = ours(torch.tensor(ids), plan.positions, AttentionBatch.for_prompts([len(ids)]), None,
                  multimodal=MultimodalBatch(rows, got_rows, got_rows.new_zeros(0, len(rows), got_rows.shape[1])))
    want = hf(**hf_inputs(ids, samples)).logits[0]
    assert want.std() > 0.5  # O(1) logits: 1e-4 is a real float32 check
    torch.testing.assert_close(ours.compute_logits(hidden), want, atol=1e-4, rtol=0)


def _greedy(models, seconds: list[float | None], max_tokens: int = 12) -> None:
    """Audio and text requests in one engine batch; each request's tokens equal transformers' generate."""
    ours, hf = models
    engine = LLMEngine(ours, _Decoder(), [], EngineConfig(block_size=8, kv_cache_memory=2**23))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts, inputs, samples = [], [], []
    for i, s in enumerate(seconds):
        if s is None:
            prompts.append([151644, 30 + i, 31, 32, 33])
            inputs.append(None)
            samples.append(None)
            continue
        x, audio = clip(s, seed=10 + i)
        prompts.append(asr_prompt(ours.audio_tokens(audio)))
        inputs.append(MultimodalInputs(audios=[audio]))
        samples.append(x)
    outs = engine.generate_all(prompts, [params] * len(prompts), inputs)
    for ids, x, out in zip(prompts, samples, outs):
        want = hf.generate(**hf_inputs(ids, x), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want


@torch.inference_mode()
def test_greedy_batch_mixing_audio_and_text_matches_transformers(models) -> None:
    _greedy(models, [0.5, None, 6.1, 2.37, None])


@pytest.mark.slow
@torch.inference_mode()
def test_greedy_40s_clip_matches_transformers(models) -> None:
    _greedy(models, [40.0, None, 17.3], max_tokens=16)


@torch.inference_mode()
def test_encoder_cache_and_prefix_keys(models) -> None:
    """A clip repeated in a second request is encoded once; a different clip behind the same placeholder
    tokens never shares KV blocks with it."""
    ours, _ = models
    engine = LLMEngine(ours, _Decoder(), [], EngineConfig(block_size=4, kv_cache_memory=2**23))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    _, a = clip(2.0, seed=1)
    _, b = clip(2.0, seed=2)
    ids = asr_prompt(ours.audio_tokens(a))
    first = engine.generate_all([ids], [params], [MultimodalInputs(audios=[a])])[0].outputs[0].token_ids
    again = engine.generate_all([ids], [params], [MultimodalInputs(audios=[a])])[0].outputs[0].token_ids
    other = engine.generate_all([ids], [params], [MultimodalInputs(audios=[b])])[0].outputs[0].token_ids
    stats = engine.runner.multimodal.cache.stats
    assert first == again and (stats.hits, stats.misses) == (0, 2)  # the repeat hit the prefix cache outright
    solo = LLMEngine(ours, _Decoder(), [], EngineConfig(block_size=4, kv_cache_memory=2**23))
    assert other == solo.generate_all([ids], [params], [MultimodalInputs(audios=[b])])[0].outputs[0].token_ids


def test_prompt_and_audio_must_agree(models) -> None:
    ours, _ = models
    _, audio = clip(1.0)
    n = ours.audio_tokens(audio)
    with pytest.raises(RequestError, match="1 audio placeholder run"):
        ours.plan_multimodal(asr_prompt(n), [], [])
    with pytest.raises(RequestError, match=f"needs {n} placeholder tokens, the prompt has {n - 1}"):
        ours.plan_multimodal(asr_prompt(n - 1), [], [audio])
    with pytest.raises(RequestError, match="not images"):
        ours.plan_multimodal(asr_prompt(n), [object()], [audio])


def test_config_checks_and_layouts(tmp_path: Path) -> None:
    ckpt = build_asr_checkpoint(tmp_path / "c", seed=5, with_tokenizer=False)
    config = json.loads((ckpt / "config.json").read_text())
    args = Qwen3ASRArgs.from_dict(config)
    assert args.audio_token_id == AUDIO_TOKEN_ID and args.tie_word_embeddings and args.audio.window_positions == 26
    thinker = {k: v for k, v in config.items() if k not in ("audio_config", "text_config", "audio_token_id")}
    thinker["thinker_config"] = {"audio_config": config["audio_config"], "text_config": config["text_config"],
                                 "audio_token_id": 42}
    assert Qwen3ASRArgs.from_dict(thinker).audio_token_id == 42
    with pytest.raises(ConfigError, match="audio_config"):
        Qwen3ASRArgs.from_dict({k: v for k, v in config.items() if k != "audio_config"})
    with pytest.raises(ConfigError, match="output_dim"):
        Qwen3ASRArgs.from_dict({**config, "audio_config": {**config["audio_config"], "output_dim": 32}})
    assert Qwen3ASRForConditionalGeneration.sanitize("thinker.audio_tower.proj2.bias") == \
        "model.multi_modal_projector.linear_2.bias"
    assert Qwen3ASRForConditionalGeneration.sanitize("thinker.model.norm.weight") == "model.language_model.norm.weight"
    # strict loading: a missing encoder tensor is named
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.audio_tower.layers.1.fc2.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="audio_tower.layers.1.fc2.weight"):
        load_model(tmp_path)


@torch.inference_mode()
def test_prepared_bfloat16_encoder_takes_the_window_kernel(models, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU preparation swaps the encoder's window attention for the native kernel (where it builds with
    AVX512-BF16); in bfloat16 the prepared encoder is as close to the float32 one as the plain bfloat16 one."""
    ours, _ = models  # an engine test before may have prepared it: the plain copy gets the reference back
    plain = copy.deepcopy(ours).to(torch.bfloat16)
    for layer in plain.model.audio_tower.layers:
        layer.self_attn.attend_windows = window_attention
    prepared = copy.deepcopy(plain)
    layers = len(prepared.model.audio_tower.layers)
    assert fast_paths.prepare_for_cpu(prepared, linears=False).window_attention_layers == layers
    _, audio = clip(CLIPS["6.1s-3-windows"], seed=3)
    want = ours.encode_audio([audio])[0].embeds
    slow = plain.encode_audio([audio])[0].embeds.float()
    calls = count_segment_attention(monkeypatch)
    fast = prepared.encode_audio([audio])[0].embeds.float()
    assert calls == [[0, 26, 52, 78, 80]] * layers  # 80 positions in windows of 26 (2 s), one call a layer
    if bf16_kernel_level():  # elsewhere the kernel answers None: SDPA
        plain_error = ((slow - want).norm() / want.norm()).item()
        assert 0 < plain_error < 0.05
        assert ((fast - want).norm() / want.norm()).item() < 1.5 * plain_error
