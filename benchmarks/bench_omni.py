"""Qwen3-Omni spoken answers on CPU: first-audio latency (request start -> first audio sample) and real-time
factor of qwenstack's streamed answer against transformers' `generate(return_audio=True)`, in one process.

Both sides get the same text prompt, greedy Thinker and Talker, exactly --tokens answer tokens (min = max new
tokens; a random Thinker would rarely end on EOS anyway) and exactly --frames Talker frames (a random Talker
never says EOS; transformers' talker_max_new_tokens = frames + 1 because its last sampled code is never
decoded, ours TalkerSampling.max_frames = frames with no text-derived limit). Two random shapes: "tiny" (the
test checkpoint of tests/omni_checkpoints.py) and "small" (Thinker 4 x 512 with 16 experts, Talker 4 x 256,
16 code groups, Code2Wav 256 wide with the released 72-frame window). Rounds alternate ours/theirs and the
medians are reported, because the two cores are shared with other work.

qwenstack's side is the path the server streams: the engine generates the answer token by token and each
step's tokens go to the speech session (AnswerSpeech), whose Talker trails the text by about two tokens and
whose Code2Wav emits exact chunks (first after 1 frame, then every 4). It runs in one thread here; the server
runs the engine and the speech in two. transformers returns nothing before Thinker, Talker and Code2Wav have
all finished, so its first audio is its total time.

    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/bench_omni.py --tokens 16 --frames 40 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep: the cores are shared
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))  # tokenizer_training: the test tokenizer

from common import machine, save  # noqa: E402
from omni_checkpoints import build_omni_checkpoint, load_hf_omni  # noqa: E402

SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {},
    "small": {
        "thinker_text": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_experts": 16,
                         "num_experts_per_tok": 4, "moe_intermediate_size": 256, "mlp_only_layers": [],
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [12, 10, 10],
                                             "interleaved": True}},
        "talker_text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8,
                        "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                        "shared_expert_intermediate_size": 256,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [12, 10, 10],
                                            "interleaved": True}},
        "code_predictor": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_code_groups": 16},
        "code2wav": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "decoder_dim": 256, "sliding_window": 72},
    },
}
IM_START, IM_END, NL = 151644, 151645, 198
PUBLISHED_FIRST_PACKET_MS = 234  # Qwen3-Omni tech report (arXiv 2509.17765), audio input, concurrency 1, vLLM GPU


@dataclass
class Run:
    first_audio_s: float  # request start -> first audio sample in hand
    total_s: float
    audio_s: float  # seconds of audio produced

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s


def prompt_ids(role_ids: dict[str, int]) -> list[int]:
    """A short text chat turn: system, user, assistant head (ids of the test tokenizer's vocabulary)."""
    return [IM_START, role_ids["system_token_id"], NL, 50, 51, IM_END, NL, IM_START, role_ids["user_token_id"], NL,
            60, 61, 62, 63, 64, IM_END, NL, IM_START, role_ids["assistant_token_id"], NL]


@torch.inference_mode()
def run_ours(model: Any, tokenizer: Any, ids: list[int], tokens: int, frames: int) -> tuple[Run, list[int], torch.Tensor]:
    from qwenstack.audio.omni_speech import AnswerSpeech
    from qwenstack.engine.engine import EngineConfig, LLMEngine
    from qwenstack.engine.params import SamplingParams
    from qwenstack.models.qwen3_omni_moe_talker import TalkerSampling

    engine = LLMEngine(model, tokenizer, [IM_END], EngineConfig(block_size=16, kv_cache_memory=2**26,
                                                           enable_prefix_caching=False))
    c2w = model.code2wav
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens)
    start = time.perf_counter()
    speech = AnswerSpeech(model, ids, None, "ethan", [IM_END], sampling=TalkerSampling(temperature=0.0,
                                                                                       max_frames=frames))
    engine.add_request("bench", ids, params)
    first, parts, answer = None, [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            comp = out.outputs[0]
            answer += comp.delta_token_ids
            parts.append(speech.feed(comp.delta_token_ids))
            if comp.finished:
                parts.append(speech.finish())
            if first is None and parts[-1].numel():
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    engine.close()
    wav = torch.cat(parts)
    assert first is not None and speech.codes.shape[0] == frames, (first, speech.codes.shape)
    return Run(first, total, wav.numel() / c2w.sample_rate), answer, wav


@torch.inference_mode()
def run_transformers(hf: Any, tokenizer: Any, ids: list[int], tokens: int, frames: int) -> tuple[Run, list[int], torch.Tensor]:
    input_ids = torch.tensor([ids])
    start = time.perf_counter()
    out, wav = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), speaker="Ethan",
                           thinker_max_new_tokens=tokens, thinker_min_new_tokens=tokens, thinker_do_sample=False,
                           talker_do_sample=False, talker_max_new_tokens=frames + 1)
    total = time.perf_counter() - start
    wav = wav.reshape(-1)
    # Nothing comes out of generate() before it returns: its first audio sample is its total time.
    return Run(total, total, wav.numel() / 24000), out[0, len(ids):].tolist(), wav


def bench_shape(name: str, tokens: int, frames: int, rounds: int, work: Path) -> dict[str, Any]:
    from omni_checkpoints import ROLE_IDS
    from qwenstack.models.registry import load_model

    from qwenstack.tokenizer import Tokenizer

    path = build_omni_checkpoint(work / name, seed=11, sizes=SHAPES[name])
    ours, hf, tok = load_model(path, dtype=torch.float32), load_hf_omni(path), Tokenizer.from_dir(path)
    ids = prompt_ids(ROLE_IDS)
    run_ours(ours, tok, ids, 2, 2), run_transformers(hf, tok, ids, 2, 2)  # warm-up: first calls, lazy imports
    mine, theirs, same = [], [], []
    for r in range(rounds):  # alternate which goes first, so drift in the shared machine's load hits both
        order = [("ours", run_ours, ours), ("transformers", run_transformers, hf)]
        results = {}
        for label, fn, model in (order if r % 2 == 0 else order[::-1]):
            results[label] = fn(model, tok, ids, tokens, frames)
        (a, a_ids, a_wav), (b, b_ids, b_wav) = results["ours"], results["transformers"]
        mine.append(a), theirs.append(b)
        same.append(a_ids == b_ids and a_wav.shape == b_wav.shape and bool(torch.allclose(a_wav, b_wav, atol=1e-4)))
        print(f"{name} round {r}: ours first {a.first_audio_s:.3f} s total {a.total_s:.3f} s | "
              f"transformers {b.total_s:.3f} s | same answer and audio: {same[-1]}", flush=True)

    def med(runs: list[Run], field: str) -> float:
        return statistics.median(getattr(r, field) if field != "rtf" else r.rtf for r in runs)

    params = sum(p.numel() for p in ours.parameters())
    return {"shape": name, "params": params, "tokens": tokens, "frames": frames, "rounds": rounds,
            "audio_s": mine[0].audio_s, "same_output_every_round": all(same),
            "ours": {k: med(mine, k) for k in ("first_audio_s", "total_s", "rtf")},
            "transformers": {k: med(theirs, k) for k in ("first_audio_s", "total_s", "rtf")},
            "runs": {"ours": [asdict(r) for r in mine], "transformers": [asdict(r) for r in theirs]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(machine()["threads"])
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            results.append(bench_shape(name, args.tokens, args.frames, args.rounds, Path(tmp)))
    end_load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    path = save("omni", {"results": results, "loadavg_start": load, "loadavg_end": end_load,
                         "published_first_packet_ms": PUBLISHED_FIRST_PACKET_MS})
    print(f"| shape | params | ours first audio | transformers first audio | ours RTF | transformers RTF |")
    for r in results:
        o, t = r["ours"], r["transformers"]
        print(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {o['first_audio_s'] * 1000:.0f} ms | "
              f"{t['first_audio_s'] * 1000:.0f} ms | {o['rtf']:.2f} | {t['rtf']:.2f} |")
    print(f"load average {load} -> {end_load}; wrote {path}")


if __name__ == "__main__":
    main()
