"""Speech-to-text speed on a Qwen3-ASR-0.6B-shaped random checkpoint: our engine against transformers in the
same run, and the lag of live transcription.

    python benchmarks/bench_asr.py --out /tmp/asrbench/qwen3-asr-0.6b            # builds the checkpoint once

- Real-time factor (audio seconds per wall second) on one 60 s clip, from 16 kHz samples to the last token:
  features, the audio encoder, the prefill and `--tokens` greedy tokens (forced: random weights would
  otherwise stop anywhere), ours as one request, transformers' feature extractor plus `generate`.
- 16 concurrent transcriptions of 4 s clips (`--tokens-each` tokens each): ours as one engine batch,
  transformers one clip after another (what its generate does for a stream of independent requests).
- With --split N: each side's prefill and decode step timed apart, N rounds, on fresh clips (see split_rounds).
- Live lag: a 16 s clip (--live-seconds) fed in 100 ms chunks on a real-time schedule through `Transcriber` (a decode
  every 2 s of audio, the official re-feed with a 5-token rollback). Update lag: from a chunk's arrival to
  the first decode result that includes it; commit lag: to the result of the decode after that one (the
  rollback leaves a decode's last tokens open until the next). Median and p95 over chunks.
The checkpoint uses the published 0.6B sizes (AuT 18 layers x 896, 14 heads, ffn 3584, projector to 1024;
Qwen3-0.6B decoder 28 layers x 1024, 16/8 heads, tied) with transformers' random initialisation.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, threads  # noqa: E402

from qwenstack.audio.asr import AsrPrompter  # noqa: E402
from qwenstack.audio.features import MelSettings  # noqa: E402
from qwenstack.audio.live import LiveSettings, Transcriber  # noqa: E402
from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.llm import LLM  # noqa: E402
from qwenstack.multimodal.inputs import MultimodalInputs  # noqa: E402

AUDIO_0_6B = dict(num_mel_bins=128, encoder_layers=18, encoder_attention_heads=14, encoder_ffn_dim=3584, d_model=896,
                  output_dim=1024, downsample_hidden_size=480, n_window=50, n_window_infer=800)
TEXT_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536,
                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                 tie_word_embeddings=True)
EOS = [151645, 151643]


def build_checkpoint(out: Path, dtype: torch.dtype) -> Path:
    if (out / "config.json").is_file():
        return out
    import json

    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from asr_checkpoints import PREPROCESSOR_CONFIG, write_asr_tokenizer

    torch.manual_seed(0)
    config = transformers.Qwen3ASRConfig(audio_config=AUDIO_0_6B, text_config=TEXT_0_6B, tie_word_embeddings=True)
    model = transformers.Qwen3ASRForConditionalGeneration(config).to(dtype).eval()
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    write_asr_tokenizer(out)  # the test tokenizer with Qwen3-ASR's special-token ids
    return out


def speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    voiced = 0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(2 * np.pi * 0.4 * t)) * t)
    gate = (np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)) > -0.4)
    return ((voiced + 0.1 * rng.standard_normal(n)) * gate).astype(np.float32)


def forced(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)


# --- ours ---------------------------------------------------------------------------------------------


def ours_batch(llm: LLM, prompter: AsrPrompter, clips: list[np.ndarray], tokens: int) -> float:
    """Seconds from samples to the last token of every clip, all submitted at once."""
    start = time.perf_counter()
    prompts, inputs = [], []
    for samples in clips:
        clip = prompter.clip(samples)
        prompts.append(prompter.prompt_ids(clip))
        inputs.append(MultimodalInputs(audios=[clip]))
    outs = llm.engine.generate_all(prompts, [forced(tokens)] * len(clips), inputs)
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
    return time.perf_counter() - start


# --- transformers ---------------------------------------------------------------------------------


def hf_one(hf: Any, extractor: Any, prompter: AsrPrompter, samples: np.ndarray, tokens: int) -> float:
    start = time.perf_counter()
    features = extractor(samples, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
    ids = torch.tensor([prompter.prompt_ids(prompter.clip(samples))])  # the same prompt (token ids only)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, input_features=features["input_features"].to(hf.dtype),
                          input_features_mask=features["attention_mask"], max_new_tokens=tokens,
                          min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == tokens
    return time.perf_counter() - start


def split_rounds(llm: LLM, prompter: AsrPrompter, hf: Any, extractor: Any, rounds: int,
                 tokens: int = 50) -> list[dict[str, float]]:
    """Each side's 60 s prefill (one token) and decode step ((1 + tokens) - 1 token, per token), on a fresh
    clip for every one of our passes: the engine caches a clip's encoder output and prefix blocks, so a repeat
    of the same clip would skip the prefill."""
    out = []
    for r in range(rounds):
        fresh = [speech_like(60.0, seed=100 + 2 * r + k) for k in range(2)]
        ours_prefill = ours_batch(llm, prompter, [fresh[0]], 1)
        ours_step = (ours_batch(llm, prompter, [fresh[1]], 1 + tokens) - ours_prefill) / tokens
        row = {"ours_prefill_s": ours_prefill, "ours_step_s": ours_step}
        if hf is not None:
            hf_prefill = hf_one(hf, extractor, prompter, fresh[0], 1)
            hf_full = hf_one(hf, extractor, prompter, fresh[0], 1 + tokens)
            row.update(transformers_prefill_s=hf_prefill, transformers_step_s=(hf_full - hf_prefill) / tokens)
        print("split:", {k: round(v, 4) for k, v in row.items()}, flush=True)
        out.append(row)
    return out


# --- live ----------------------------------------------------------------------------------------------


def live_lag(llm: LLM, samples: np.ndarray, chunk_s: float = 0.1) -> dict[str, Any]:
    t = Transcriber(llm, LiveSettings())
    step = int(chunk_s * 16000)
    chunks = [samples[i:i + step] for i in range(0, len(samples), step)]
    arrival: list[float] = []
    results: list[tuple[float, int]] = []  # (when a decode's result was ready, samples it covered)
    start = time.perf_counter()
    for i, chunk in enumerate(chunks):
        due = start + (i + 1) * chunk_s  # the chunk is complete at the end of its 100 ms
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        arrival.append(max(due, now) - start)
        before = t.state.decodes
        t.feed(chunk)
        if t.state.decodes > before:
            results.append((time.perf_counter() - start, t.state.decoded_samples))
    update, commit = [], []
    covered = 0
    for i, at in enumerate(arrival):
        covered += len(chunks[i])
        first = next((k for k, (_, n) in enumerate(results) if n >= covered), None)
        if first is None:
            continue  # only the final pass covers this chunk
        update.append(results[first][0] - at)
        if first + 1 < len(results):
            commit.append(results[first + 1][0] - at)

    def stats(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median_s": round(statistics.median(xs), 3), "p95_s": round(xs[int(0.95 * (len(xs) - 1))], 3),
                "chunks": len(xs)}

    return {"audio_s": len(samples) / 16000, "decodes": len(results), "update_lag": stats(update),
            "commit_lag": stats(commit)}


def decoder_form(llm: LLM) -> str:
    """The module type of the decoder's first MLP matrix: nn.Linear (plain), PackedLinear or TiledLinear."""
    mlp = llm.loaded.model.model.language_model.layers[0].mlp
    return type(next(m for m in mlp.modules() if m is not mlp)).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/asrbench/qwen3-asr-0.6b"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=150, help="tokens generated for the 60 s clip")
    parser.add_argument("--tokens-each", type=int, default=12, help="tokens per clip of the 16 concurrent ones")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--live-seconds", type=float, default=16.0)
    parser.add_argument("--split", type=int, default=0, metavar="ROUNDS",
                        help="also time each side's prefill and decode step apart, in this many rounds")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    dtype = getattr(torch, args.dtype)
    path = build_checkpoint(args.out, dtype)
    llm = LLM(path, dtype=args.dtype, device="cpu", kv_cache_memory=2**30)
    prompter = AsrPrompter(llm.tokenizer, llm.loaded.model, MelSettings())
    long = speech_like(60.0, seed=1)
    short = [speech_like(4.0, seed=10 + i) for i in range(16)]
    results: dict[str, Any] = {"model": "qwen3-asr-0.6b-shaped (random)", "dtype": args.dtype,
                               "tokens_60s": args.tokens, "tokens_each_16": args.tokens_each,
                               # the CPU linear form the runner chose at load for the decoder's matrices
                               "decoder_linear_form": decoder_form(llm),
                               "load_average_start": os.getloadavg()[0]}
    hf = extractor = None
    if not args.no_transformers:
        import transformers

        hf = transformers.Qwen3ASRForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        extractor = transformers.Qwen3ASRFeatureExtractor()
        hf_one(hf, extractor, prompter, short[0], 2)  # warm-up
    ours_batch(llm, prompter, [short[0]], 2)  # warm-up
    # Pairs run back to back, so that load from other work on the machine hits both sides alike.
    results["ours_60s_s"] = ours_batch(llm, prompter, [long], args.tokens)
    results["ours_rtf"] = 60.0 / results["ours_60s_s"]
    print("ours 60 s:", results["ours_60s_s"], flush=True)
    if hf is not None:
        results["transformers_60s_s"] = hf_one(hf, extractor, prompter, long, args.tokens)
        results["transformers_rtf"] = 60.0 / results["transformers_60s_s"]
        results["rtf_speedup"] = results["ours_rtf"] / results["transformers_rtf"]
        print("transformers 60 s:", results["transformers_60s_s"], flush=True)
    save("asr-qwen3-asr-0.6b", results)
    if args.split:
        results["split"] = split_rounds(llm, prompter, hf, extractor, args.split)
        save("asr-qwen3-asr-0.6b", results)
    results["ours_16_concurrent_s"] = ours_batch(llm, prompter, short, args.tokens_each)
    print("ours 16 concurrent:", results["ours_16_concurrent_s"], flush=True)
    if hf is not None:
        results["transformers_16_sequential_s"] = sum(hf_one(hf, extractor, prompter, s, args.tokens_each)
                                                      for s in short)
        results["concurrency_speedup"] = results["transformers_16_sequential_s"] / results["ours_16_concurrent_s"]
        print("transformers 16 one by one:", results["transformers_16_sequential_s"], flush=True)
        del hf
    save("asr-qwen3-asr-0.6b", results)
    if not args.skip_live:
        results["live"] = live_lag(llm, speech_like(args.live_seconds, seed=3))
        print("live:", results["live"], flush=True)
    results["load_average_end"] = os.getloadavg()[0]
    print(save("asr-qwen3-asr-0.6b", results))


if __name__ == "__main__":
    main()
