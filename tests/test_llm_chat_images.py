"""LLM.chat takes images as the server does (the same content parts, the same loader): a data: URL and a
local path give exactly what the engine gives for the hand-built prompt and preprocessed images; a bad image
is a RequestError naming the part; stop strings skip the think block there too."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vl_checkpoints import IMAGE_TOKEN_ID, build_vl_checkpoint, data_url, noise_image, png_bytes
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.llm import LLM
from qwenstack.multimodal.inputs import MultimodalInputs, images_from_processed
from qwenstack.serving.images import image_processor_for

pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, max_tokens=6)
IMAGE_A, IMAGE_B = noise_image(70, 50, seed=1), noise_image(90, 120, seed=2)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = build_vl_checkpoint(tmp_path_factory.mktemp("vl-llm"), "dense", tie=False, seed=5, with_tokenizer=True)
    return LLM(path, dtype=torch.float32, device="cpu", kv_cache_memory=2**23, block_size=4)


def test_chat_with_images_matches_the_engine(llm: LLM, tmp_path: Path) -> None:
    file_b = tmp_path / "b.png"
    file_b.write_bytes(png_bytes(IMAGE_B))
    content = [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": data_url(IMAGE_A)}},
               {"type": "image_url", "image_url": {"url": str(file_b)}}, {"type": "text", "text": " please."}]
    out = llm.chat([{"role": "user", "content": content}], GREEDY, enable_thinking=False)[0]

    tok = llm.tokenizer
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Compare {placeholder * 2} please."}],
                                     enable_thinking=False)
    processor = image_processor_for(llm.loaded.config, llm.loaded.path)
    processed = processor([png_bytes(IMAGE_A), png_bytes(IMAGE_B)])
    counts = iter(processed.num_image_tokens)
    expanded: list[int] = []
    for t in tok.encode(prompt):
        expanded += [IMAGE_TOKEN_ID] * next(counts) if t == IMAGE_TOKEN_ID else [t]
    want = llm.engine.generate_all([expanded], [GREEDY], [MultimodalInputs(images_from_processed(processed))])[0]
    assert out.prompt_token_ids == expanded and len(expanded) > 16
    assert out.outputs[0].token_ids == want.outputs[0].token_ids
    # Text-only conversations still work, and take the same path as before.
    assert llm.chat([{"role": "user", "content": "Hi"}], GREEDY, enable_thinking=False)[0].outputs[0].token_ids


def test_bad_images_are_request_errors(llm: LLM) -> None:
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[0\]"):
        llm.chat(bad, GREEDY)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    with pytest.raises(RequestError, match="remote"):
        llm.chat(remote, GREEDY)
