"""The engine serving a tiny random Qwen3-VL: requests with and without images batched together, chunked
prefill that splits images, the encoder cache, the prefix cache keyed by image content, preemption, and
images refused by a text-only model. The reference is each request alone on a fresh engine, which
test_qwen3_vl.py checks against transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vl_checkpoints import build_vl_checkpoint, image_prompt
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.models.registry import load_model
from qwenstack.multimodal.inputs import ImageInput, MultimodalInputs


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PATCH_DIM = 3 * 2 * 16 * 16


def image(grid: tuple[int, int, int], seed: int) -> ImageInput:
    t, h, w = grid
    return ImageInput.from_pixels(torch.randn(t * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(seed)), grid)


A, B, C = image((1, 4, 6), 1), image((1, 6, 8), 2), image((1, 2, 4), 3)  # 6, 12 and 2 placeholder tokens
REQUESTS = [  # (prompt, images)
    (image_prompt([[5, 6, 7], [8, 9]], [6]), [A]),
    ([40, 41, 42, 43, 44, 45, 46], []),
    (image_prompt([[10], [11, 12, 13], [14]], [12, 2]), [B, C]),
    (image_prompt([[15, 16, 17, 18, 19], [20]], [12]), [B]),
    ([50, 51], []),
]


class _Decoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    path = build_vl_checkpoint(tmp_path_factory.mktemp("vl-engine"), "dense", tie=False, seed=4)
    return load_model(path, dtype=torch.float32)


def make_engine(model: torch.nn.Module, **options) -> LLMEngine:
    return LLMEngine(model, _Decoder(), [], EngineConfig(**{"block_size": 4, "kv_cache_memory": 2**22, **options}))


def run(engine: LLMEngine, requests: list) -> list[list[int]]:
    outs = engine.generate_all([p for p, _ in requests], [GREEDY] * len(requests),
                               [MultimodalInputs(list(images)) for _, images in requests])
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def alone(model: torch.nn.Module) -> list[list[int]]:
    return [run(make_engine(model, enable_prefix_caching=False), [r])[0] for r in REQUESTS]


CONFIGS = {
    "batched": {},
    # 5 tokens a step: every image is split across chunks, and chunks hold an image's tail and the next's head
    "chunked-prefill": {"max_num_batched_tokens": 5},
    "tiny-pool-preempts": {"kv_cache_memory": 2 * 3 * 2 * 16 * 4 * 4 * 16},  # 16 blocks of 4 tokens
    "few-seqs": {"max_num_seqs": 2},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_matches_each_request_alone(model: torch.nn.Module, alone: list[list[int]], name: str) -> None:
    engine = make_engine(model, **CONFIGS[name])
    assert run(engine, REQUESTS) == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if name == "tiny-pool-preempts":
        assert engine.counters.preemptions > 0
    assert len({len(set(a)) for a in alone}) > 1 and all(len(set(a)) > 2 for a in alone)  # varied outputs


def test_warm_encoder_cache_skips_the_vision_tower(model: torch.nn.Module, alone: list[list[int]]) -> None:
    engine = make_engine(model, enable_prefix_caching=False)
    stats = engine.runner.multimodal.cache.stats
    assert run(engine, REQUESTS[2:4]) == alone[2:4]  # B appears in both: encoded once
    assert stats.misses == 2
    calls = []
    encode = model.encode_images
    model.encode_images = lambda images: calls.append(len(images)) or encode(images)  # type: ignore[method-assign]
    try:
        assert run(engine, REQUESTS) == alone  # B and C are cached now, A is new
    finally:
        del model.encode_images
    assert calls == [1] and stats.misses == 3 and stats.hits >= 2
    cold = make_engine(model, encoder_cache_memory=0, enable_prefix_caching=False)  # nothing kept: still correct
    assert run(cold, REQUESTS) == alone and cold.runner.multimodal.cache.stats.hits == 0


def test_prefix_cache_is_keyed_by_image_content(model: torch.nn.Module, alone: list[list[int]]) -> None:
    engine = make_engine(model)
    prompt, _ = REQUESTS[0]
    other = image(A.grid_thw, seed=99)  # same size, so the same placeholder tokens, other pixels
    first = engine.generate_all([prompt], [GREEDY], [MultimodalInputs([A])])[0]
    again = engine.generate_all([prompt], [GREEDY], [MultimodalInputs([A])])[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == alone[0]
    assert again.metrics.num_cached_tokens == (len(prompt) - 1) // 4 * 4
    swapped = engine.generate_all([prompt], [GREEDY], [MultimodalInputs([other])])[0]
    # Only the block before the image is shared; the answer is the other image's.
    assert swapped.metrics.num_cached_tokens == 4
    assert swapped.outputs[0].token_ids == run(make_engine(model), [(prompt, [other])])[0] != alone[0]


def test_n_samples_share_the_images(model: torch.nn.Module) -> None:
    """Siblings join once the prompt is cached and compute its uncached tail: they need the images too."""
    prompt, images = REQUESTS[2]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = make_engine(model).generate_all([prompt], [params], [MultimodalInputs(images)])[0]
    for i, sample in enumerate(out.outputs):  # sample i is seeded seed + i
        single = SamplingParams(temperature=1.0, seed=7 + i, max_tokens=6, ignore_eos=True)
        want = make_engine(model).generate_all([prompt], [single], [MultimodalInputs(images)])[0]
        assert sample.token_ids == want.outputs[0].token_ids


def test_requests_that_do_not_fit_are_refused(model: torch.nn.Module, tiny_qwen3: Path) -> None:
    engine = make_engine(model)
    prompt, images = REQUESTS[2]
    with pytest.raises(RequestError, match="2 image placeholder run.* but 1 image"):
        engine.add_request("r1", prompt, GREEDY, multimodal=MultimodalInputs(images[:1]))
    with pytest.raises(RequestError, match="placeholder"):
        engine.add_request("r2", prompt, GREEDY)  # placeholders without images
    text_engine = LLMEngine(load_model(tiny_qwen3, dtype=torch.float32), _Decoder(), [],
                            EngineConfig(block_size=4, kv_cache_memory=2**20))
    with pytest.raises(RequestError, match="does not accept images"):
        text_engine.add_request("r3", [1, 2, 3], GREEDY, multimodal=MultimodalInputs([A]))
    assert not engine.has_unfinished_requests() and not text_engine.has_unfinished_requests()
