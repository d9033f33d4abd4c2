"""Writes the Qwen3-TTS parity fixtures (tests/fixtures/tts/) from the official `qwen-tts` package.

Runs in its own environment, NOT the project's (qwen-tts pins transformers 4.57.3 and needs a torchaudio
stand-in); see scripts/tts_reference/README.md for the setup. For each model kind (custom_voice,
voice_design, base) it builds the tiny model of tests/tts_checkpoints.py, fills every tensor from the
recipe (seed + name), and records:
  <kind>_recipe.json  the config.json of the model and of its speech tokenizer, tensor names/shapes, seeds
                      and the sha256 of the weights (the tests rebuild them and compare)
  <kind>.npz          reference outputs: talker prefill logits, greedy codec codes, speaker embedding,
                      12 Hz tokenizer encode codes, decoded waveform (full and chunked)

    PYTHONPATH=/work/ttsref-venv/stubs /work/ttsref-venv/bin/python scripts/tts_reference/make_fixtures.py
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import tts_checkpoints as recipe  # noqa: E402
from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig  # noqa: E402
from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration  # noqa: E402
from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config  # noqa: E402
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model  # noqa: E402

SEEDS = {"custom_voice": 11, "voice_design": 12, "base": 13}
TOKENIZER_SEED = 21
MAX_NEW = 24
LOGIT_ROWS = 4  # the last rows of the prefill logits kept in the fixtures

# "<|im_start|>assistant\n" + text + "<|im_end|>\n<|im_start|>assistant\n", as ids of the tiny text vocab.
ROLE, TAIL = [1003, 7, 8], [1004, 9, 1003, 7, 8]
TEXT = [40, 41, 42, 43, 44, 45, 46]
REF_TEXT = [60, 61, 62, 63]
INSTRUCT = [1003, 5, 6, 70, 71, 72, 73, 1004, 9]  # "<|im_start|>user\n{instruct}<|im_end|>\n"


def fill(module: torch.nn.Module, seed: int) -> list[list[Any]]:
    state = module.state_dict()
    manifest = [[name, list(t.shape), str(t.dtype).replace("torch.", "")] for name, t in state.items()]
    values = recipe.recipe_state(manifest, seed)
    module.load_state_dict(values, strict=True)
    return manifest


def saved_config(module: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        module.config.save_pretrained(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())


class PrefillLogits:
    """Keeps the first codec_head output of a generate() call: the talker's prefill logits."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.first: torch.Tensor | None = None
        head.register_forward_hook(self.hook)

    def hook(self, module: Any, inputs: Any, output: torch.Tensor) -> None:
        if self.first is None:
            self.first = output.detach().clone()

    def take(self) -> np.ndarray:
        assert self.first is not None
        out, self.first = self.first, None
        return out[0, -LOGIT_ROWS:].float().numpy()


def build_tokenizer() -> tuple[Qwen3TTSTokenizerV2Model, dict[str, Any]]:
    config = Qwen3TTSTokenizerV2Config(**recipe.tokenizer_config())
    model = Qwen3TTSTokenizerV2Model(config).eval()
    manifest = fill(model, TOKENIZER_SEED)
    return model, {"config": saved_config(model), "manifest": manifest, "seed": TOKENIZER_SEED,
                   "sha256": recipe.state_hash(model.state_dict())}


def generate(model: Any, logits: PrefillLogits, out: dict[str, np.ndarray], tag: str, **kwargs: Any) -> None:
    codes, _ = model.generate(max_new_tokens=MAX_NEW, do_sample=False, subtalker_dosample=False, **kwargs)
    out[f"{tag}_codes"] = codes[0].numpy().astype(np.int64)
    out[f"{tag}_logits"] = logits.take()
    print(f"  {tag}: {tuple(codes[0].shape)} codes")


def main() -> None:
    out_dir = recipe.FIXTURES
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer, tokenizer_recipe = build_tokenizer()
    ids = torch.tensor([ROLE + TEXT + TAIL])
    clip = recipe.reference_clip()
    for kind in recipe.KINDS:
        print(kind)
        config = Qwen3TTSConfig(**recipe.talker_config(kind))
        model = Qwen3TTSForConditionalGeneration(config).eval()
        manifest = fill(model, SEEDS[kind])
        model_recipe = {"config": saved_config(model), "manifest": manifest, "seed": SEEDS[kind],
                        "sha256": recipe.state_hash(model.state_dict())}
        logits = PrefillLogits(model.talker.codec_head)
        out: dict[str, np.ndarray] = {"text_ids": ids[0].numpy()}
        with torch.no_grad():
            if kind == "custom_voice":
                generate(model, logits, out, "stream_english_vivian", input_ids=[ids], languages=["english"],
                         speakers=["vivian"], non_streaming_mode=False)
                generate(model, logits, out, "full_auto_eric", input_ids=[ids], languages=["auto"],
                         speakers=["eric"], non_streaming_mode=True)
                generate(model, logits, out, "full_chinese_vivian", input_ids=[ids], languages=["chinese"],
                         speakers=["vivian"], non_streaming_mode=True)
            elif kind == "voice_design":
                out["instruct_ids"] = np.array(INSTRUCT)
                generate(model, logits, out, "design_english", input_ids=[ids], instruct_ids=[torch.tensor([INSTRUCT])],
                         languages=["english"], speakers=[None], non_streaming_mode=True)
                generate(model, logits, out, "design_auto_stream", input_ids=[ids],
                         instruct_ids=[torch.tensor([INSTRUCT])], languages=["auto"], speakers=[None],
                         non_streaming_mode=False)
            else:
                embedding = model.extract_speaker_embedding(clip, 24000)
                out["speaker_embedding"] = embedding.float().numpy()
                ref_codes = tokenizer.encode(torch.from_numpy(clip)[None], padding_mask=torch.ones(1, clip.size,
                                             dtype=torch.long), return_dict=True).audio_codes[0]
                out["encode_codes"] = ref_codes.numpy().astype(np.int64)
                ref_ids = torch.tensor([ROLE + REF_TEXT + TAIL[:2]])
                out["ref_ids"] = ref_ids[0].numpy()
                prompt = {"ref_code": [None], "ref_spk_embedding": [embedding], "x_vector_only_mode": [True],
                          "icl_mode": [False]}
                generate(model, logits, out, "xvector_english", input_ids=[ids], languages=["english"],
                         speakers=[None], voice_clone_prompt=prompt, non_streaming_mode=False)
                prompt = {"ref_code": [ref_codes], "ref_spk_embedding": [embedding], "x_vector_only_mode": [False],
                          "icl_mode": [True]}
                generate(model, logits, out, "icl_english", input_ids=[ids], ref_ids=[ref_ids],
                         languages=["english"], speakers=[None], voice_clone_prompt=prompt, non_streaming_mode=False)
                generate(model, logits, out, "icl_auto_full", input_ids=[ids], ref_ids=[ref_ids],
                         languages=["auto"], speakers=[None], voice_clone_prompt=prompt, non_streaming_mode=True)
                # The codec: a fixed pattern of codes (so the fixture does not depend on generation), decoded in
                # full, through the wrapper's chunked_decode, and in chunks of 4 with 8 frames of left context.
                frames = 8
                codes = (torch.arange(frames * recipe.GROUPS).view(frames, recipe.GROUPS) * 7 + 3) % recipe.CODEBOOK
                out["decode_codes"] = codes.numpy()
                full = tokenizer.decoder(codes.T[None])[0, 0]
                out["decode_wave"] = full.numpy()
                # The same decode in float64: float32 rounding in this tiny codec's random gains reaches ~1e-5,
                # so the exact value is what a float64 decode is held to (and a float32 one within its rounding).
                out["decode_wave64"] = copy.deepcopy(tokenizer.decoder).double()(codes.T[None])[0, 0].numpy()
                # Only how far the reference's own chunked decodes land from its full decode (the waves would
                # triple the fixture size).
                wrapper = tokenizer.decode(codes[None], return_dict=True).audio_values[0]
                chunked = tokenizer.decoder.chunked_decode(codes.T[None], 4, 8)[0, 0]
                out["decode_wrapper_max_diff"] = np.float32((wrapper - full).abs().max())
                out["decode_chunk4_left8_max_diff"] = np.float32((chunked - full).abs().max())
                print(f"  decode: {full.shape} samples, std {full.std():.3f}, max {full.abs().max():.3f}")
        (out_dir / f"{kind}_recipe.json").write_text(json.dumps(
            {"model": model_recipe, "speech_tokenizer": tokenizer_recipe}, separators=(",", ":")) + "\n")
        np.savez_compressed(out_dir / f"{kind}.npz", **out)
    sizes = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"fixtures: {sizes / 1024:.0f} KB in {out_dir}")


if __name__ == "__main__":
    main()
