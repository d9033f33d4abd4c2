"""Qwen3-TTS on CPU: time to first audio and real-time factor of one request, qwenstack against the official
qwen-tts package in the same run, and audio seconds per wall second with 8 concurrent requests.

The checkpoint is random, shaped like Qwen3-TTS-12Hz-0.6B-CustomVoice (talker 28 layers x 1024, code
predictor 5 layers, 16 code groups, 12 Hz codec decoder of 8 layers with window 72), float32, built once
under ~/.cache/qwenstack/ from the recipe of tests/tts_checkpoints.py. A random talker never says EOS, so every
request makes exactly --frames frames (80 ms each) in both implementations, with seeded sampling.

The reference runs in its own environment (scripts/tts_reference/README.md) as a subprocess: its
generate() returns all codes, then its tokenizer decodes them, so its first audio is its total time.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_tts.py --frames 25 \\
        --ref-python /work/ttsref-venv/bin/python --ref-path /work/ttsref-venv/stubs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tts_checkpoints as recipe  # noqa: E402
from common import machine, save  # noqa: E402

SPEAKERS = {"vivian": 3065, "ryan": 3061}
LANGUAGES = {"english": 2050, "chinese": 2055}


def model_config() -> dict[str, Any]:
    return dict(
        model_type="qwen3_tts", tts_model_type="custom_voice", tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size="0b6", tts_pad_token_id=151671, tts_bos_token_id=151672, tts_eos_token_id=151673,
        im_start_token_id=151644, im_end_token_id=151645, speaker_encoder_config={"enc_dim": 1024},
        talker_config=dict(
            vocab_size=3072, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, text_hidden_size=2048, text_vocab_size=151936, num_code_groups=16,
            max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000, hidden_act="silu",
            rope_scaling=dict(rope_type="default", mrope_section=[24, 20, 20], interleaved=True),
            spk_id=SPEAKERS, spk_is_dialect={k: False for k in SPEAKERS}, codec_language_id=LANGUAGES,
            codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_think_id=2154,
            codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157,
            code_predictor_config=dict(
                vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=5,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_code_groups=16,
                max_position_embeddings=65536, rms_norm_eps=1e-6, rope_theta=1000000,
                layer_types=["full_attention"] * 5)))


def codec_config() -> dict[str, Any]:
    return dict(model_type="qwen3_tts_tokenizer_12hz", encoder_valid_num_quantizers=16,
                decoder_config=dict(codebook_size=2048, codebook_dim=512, hidden_size=1024, latent_dim=1024,
                                    num_attention_heads=16, num_key_value_heads=16, head_dim=64,
                                    intermediate_size=3072, num_hidden_layers=8, num_quantizers=16, sliding_window=72,
                                    upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], decoder_dim=1536,
                                    rms_norm_eps=1e-5, rope_theta=10000))


def build(out_dir: Path) -> None:
    """Writes the random checkpoint in the published layout (each tensor from the recipe: seed + name)."""
    from safetensors.torch import save_file

    from qwenstack.models.qwen3_tts import Qwen3TTSArgs, Qwen3TTSForConditionalGeneration
    from qwenstack.models.qwen3_tts_codec import Codec12Hz, Codec12HzArgs
    from qwenstack.weights import checkpoint_state_dict

    for sub, cls, args_cls, config, seed in (("", Qwen3TTSForConditionalGeneration, Qwen3TTSArgs, model_config(), 5),
                                             ("speech_tokenizer", Codec12Hz, Codec12HzArgs, codec_config(), 6)):
        target = out_dir / sub
        target.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            model = cls(args_cls.from_dict(config))
        state = {name: recipe.recipe_tensor(name, list(t.shape), "float32", seed)
                 for name, t in checkpoint_state_dict(model)}
        if sub:  # the quantizer's input projections: unused for decoding, present in published checkpoints
            for part in ("rvq_first", "rvq_rest"):
                state[f"decoder.quantizer.{part}.input_proj.weight"] = recipe.recipe_tensor(
                    f"decoder.quantizer.{part}.input_proj.weight", [256, 512, 1], "float32", seed)
        (target / "config.json").write_text(json.dumps(config, indent=1))
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        del state


REFERENCE = r'''
import json, sys, time, torch
from safetensors.torch import load_file
from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig
from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSForConditionalGeneration
from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model
ckpt, frames, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
cfg = json.load(open(f"{ckpt}/config.json")); cfg.pop("model_type")
model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**cfg)).eval()
model.load_state_dict(load_file(f"{ckpt}/model.safetensors"), strict=True)
tcfg = json.load(open(f"{ckpt}/speech_tokenizer/config.json")); tcfg.pop("model_type")
tok = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**tcfg)).eval()
tok.load_state_dict(load_file(f"{ckpt}/speech_tokenizer/model.safetensors"), strict=False)
out = []
for run in range(2):  # the first run warms up
    torch.manual_seed(1)
    t = time.perf_counter()
    with torch.no_grad():
        codes, _ = model.generate(input_ids=[torch.tensor([ids])], languages=["english"], speakers=["vivian"],
                                  non_streaming_mode=False, max_new_tokens=frames + 1, do_sample=True,
                                  subtalker_dosample=True)
        wave = tok.decode(codes[0][None], return_dict=True).audio_values[0]
    total = time.perf_counter() - t
    out.append({"first_audio_s": total, "total_s": total, "audio_s": wave.numel() / 24000,
                "frames": int(codes[0].shape[0])})
print(json.dumps(out[-1]))
'''


def run_reference(ckpt: Path, frames: int, ids: list[int], python: str, path: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(REFERENCE)
    env = {"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    proc = subprocess.run([python, f.name, str(ckpt), str(frames), json.dumps(ids)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"reference failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(ckpt: Path, frames: int, ids: list[int], concurrent: int) -> dict[str, Any]:
    from qwenstack.tts.engine import SpeechEngine, SpeechParams, SpeechRequest
    from qwenstack.tts.loader import load_tts

    tts = load_tts(ckpt)
    engine = SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=64)

    def once(n: int) -> dict[str, Any]:
        prompt = tts.model.build_prompt(ids, "english", "vivian")
        for i in range(n):
            engine.add(SpeechRequest(f"r{i}", prompt, SpeechParams(seed=i, max_frames=frames)))
        start = time.perf_counter()
        first: float | None = None
        samples = 0
        while engine.has_work():
            for chunk in engine.step():
                if chunk.samples.numel() and first is None:
                    first = time.perf_counter() - start
                samples += chunk.samples.numel()
        total = time.perf_counter() - start
        return {"first_audio_s": first, "total_s": total, "audio_s": samples / tts.sample_rate}

    once(1)  # warm-up
    single = once(1)
    batch = once(concurrent)
    return {"single": single, "concurrent": concurrent, "batch": batch,
            "codec_context_frames": tts.codec.decoder.conv_context_frames()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--ref-python", default="/work/ttsref-venv/bin/python")
    parser.add_argument("--ref-path", default="/work/ttsref-venv/stubs")
    # Outside the repository: the random checkpoint is 4.4 GB, rebuilt from the recipe when absent.
    parser.add_argument("--checkpoint", default=str(Path.home() / ".cache" / "qwenstack" / "bench-tts-0.6b-shaped"))
    args = parser.parse_args()
    ckpt = Path(args.checkpoint)
    if not (ckpt / "speech_tokenizer" / "model.safetensors").is_file():
        build(ckpt)
    # 3 role ids, 12 text ids, 5 tail ids: a short sentence.
    ids = [151644, 77091, 198] + list(range(1000, 1012)) + [151645, 198, 151644, 77091, 198]
    reference = run_reference(ckpt, args.frames, ids, args.ref_python, args.ref_path)
    ours = run_ours(ckpt, args.frames, ids, args.concurrent)
    single, batch = ours["single"], ours["batch"]
    results = {
        "machine": machine(), "frames": args.frames, "reference": reference, "qwenstack": ours,
        "first_audio_speedup": reference["first_audio_s"] / single["first_audio_s"],
        "rtf_reference": reference["total_s"] / reference["audio_s"],
        "rtf_qwenstack": single["total_s"] / single["audio_s"],
        "batch_audio_s_per_wall_s": batch["audio_s"] / batch["total_s"],
        "single_audio_s_per_wall_s": single["audio_s"] / single["total_s"],
    }
    print(json.dumps(results, indent=1))
    save("tts-0.6b-shaped", results)


if __name__ == "__main__":
    main()
