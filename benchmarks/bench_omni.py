"""Qwen3-Omni spoken answers on CPU: time to the first audio byte and audio real-time factor of qwenstack's server
against transformers' `generate(return_audio=True)`, in one process, for 1 and 4 concurrent conversations.

Both sides answer the same chat prompt (rendered by the checkpoint's template) greedily with exactly --tokens
answer tokens (min = max new tokens) and exactly --frames Talker frames (a random Talker never says EOS;
transformers' talker_max_new_tokens = frames + 1 because its last sampled code is never decoded; the server's
max_speech_seconds = frames x 80 ms). Two random shapes: "tiny" (the test checkpoint of tests/omni_checkpoints.py)
and "small" (Qwen3-Omni's layout cut down: Thinker 4 x 512 with 16 experts, Talker 4 x 256 with 8 experts, 16
code groups, Code2Wav 256 wide with the released 72-frame window).

qwenstack's side is the real server (uvicorn in a thread of this process) streamed through the `openai` SDK:
first audio = request sent -> first `delta.audio.data` chunk received. With 4 conversations at once the
Thinker runs them in one engine batch and their Talkers in one batched speech stage. transformers returns
nothing before Thinker, Talker and Code2Wav have all finished, so its first audio is its total time, and its
generate(return_audio=True) speaks one conversation at a time: 4 conversations take 4 times one (not rerun).
Audio real-time factor = seconds of audio per wall second (above 1: faster than it plays); for 4 conversations
both per conversation and in total. Rounds rotate the order of (1 conversation, 4 conversations,
transformers) and the medians are reported, because the cores are shared with other work. Once per shape the
engine path's answer and waveform are checked equal to transformers' (greedy), so both do the same work.

    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/bench_omni.py --tokens 64 --frames 80 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
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
        """Audio seconds per wall second."""
        return self.audio_s / self.total_s


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


def serve(model: Any, tok: Any, path: Path, frames: int) -> Any:
    """The real server around the loaded model; its speech limits end every answer at exactly `frames`."""
    from server_utils import BackgroundServer
    from qwenstack.engine.engine import EngineConfig
    from qwenstack.serving.app import create_app
    from qwenstack.serving.config import ServerConfig
    from qwenstack.serving.served import build_served_model

    served = build_served_model("omni", model, tok, EngineConfig(block_size=16, kv_cache_memory=2**26,
                                                                 enable_prefix_caching=False),
                                hf_config=json.loads((path / "config.json").read_text()), model_dir=path)
    config = ServerConfig(enable_ui=False, max_speech_seconds=frames * 0.08)
    return BackgroundServer(create_app([served], config))


def converse(client: Any, messages: list[dict[str, Any]], tokens: int) -> Run:
    """One streamed spoken answer through the SDK."""
    import base64

    start = time.perf_counter()
    stream = client.chat.completions.create(model="omni", messages=messages, modalities=["text", "audio"],
                                            audio={"voice": "ethan", "format": "pcm16"}, max_tokens=tokens,
                                            temperature=0, stream=True, extra_body={"min_tokens": tokens})
    first, pcm = None, 0
    for chunk in stream:
        audio = getattr(chunk.choices[0].delta, "audio", None) if chunk.choices else None
        data = (audio if isinstance(audio, dict) else audio.model_dump()).get("data") if audio else None
        if data:
            first = first if first is not None else time.perf_counter() - start
            pcm += len(base64.b64decode(data))
    assert first is not None
    return Run(first, time.perf_counter() - start, pcm / 2 / 24000)


def run_concurrent(client: Any, messages: list[dict[str, Any]], tokens: int, n: int) -> tuple[list[Run], float]:
    """n conversations started together; their runs and the wall time until the last one ended."""
    runs: list[Run | None] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        runs[i] = converse(client, messages, tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in runs)
    return runs, time.perf_counter() - start  # type: ignore[return-value]


def bench_shape(name: str, tokens: int, frames: int, rounds: int, concurrency: int, work: Path) -> dict[str, Any]:
    import openai

    from qwenstack.models.registry import load_model
    from qwenstack.tokenizer import Tokenizer

    path = build_omni_checkpoint(work / name, seed=11, sizes=SHAPES[name])
    ours, hf, tok = load_model(path, dtype=torch.float32), load_hf_omni(path), Tokenizer.from_dir(path)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    ids = tok.encode(tok.apply_chat_template(messages))
    # The engine path (no server) against transformers, once: same answer tokens and waveform.
    _, a_ids, a_wav = run_ours(ours, tok, ids, tokens, frames)
    theirs_first, b_ids, b_wav = run_transformers(hf, tok, ids, tokens, frames)
    same = a_ids == b_ids and a_wav.shape == b_wav.shape and bool(torch.allclose(a_wav, b_wav, atol=1e-4))
    print(f"{name}: engine path and transformers give the same answer and audio: {same}", flush=True)
    one, many, many_wall, theirs = [], [], [], [theirs_first]
    with serve(ours, tok, path, frames) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        converse(client, messages, 2)  # warm-up: first request, lazy imports
        steps = {"one": lambda: one.append(converse(client, messages, tokens)),
                 "many": lambda: (lambda r: (many.append(r[0]), many_wall.append(r[1])))(
                     run_concurrent(client, messages, tokens, concurrency)),
                 "transformers": lambda: theirs.append(run_transformers(hf, tok, ids, tokens, frames)[0])}
        order = list(steps)
        for r in range(rounds):  # rotate the order, so drift in the shared machine's load hits every side
            for key in order[r % 3:] + order[:r % 3]:
                if key == "transformers" and r == 0:
                    continue  # its first round is the check run above
                steps[key]()
            print(f"{name} round {r}: first audio {one[-1].first_audio_s:.3f} s, x{concurrency} "
                  f"{statistics.median(x.first_audio_s for x in many[-1]):.3f} s | transformers "
                  f"{theirs[-1].total_s:.3f} s", flush=True)

    med = statistics.median
    audio_s = one[0].audio_s
    return {"shape": name, "params": sum(p.numel() for p in ours.parameters()), "tokens": tokens, "frames": frames,
            "prompt_tokens": len(ids), "rounds": rounds, "concurrency": concurrency, "audio_s": audio_s,
            "same_answer_and_audio": same,
            "first_audio_s": {"ours_1": med(r.first_audio_s for r in one),
                              f"ours_{concurrency}": med(med(x.first_audio_s for x in b) for b in many),
                              "transformers": med(r.total_s for r in theirs)},
            "audio_per_wall_s": {"ours_1": med(r.rtf for r in one),
                                 f"ours_{concurrency}_each": med(med(x.rtf for x in b) for b in many),
                                 f"ours_{concurrency}_total": med(sum(x.audio_s for x in b) / w
                                                                  for b, w in zip(many, many_wall)),
                                 "transformers": med(r.rtf for r in theirs)},
            "runs": {"ours_1": [asdict(r) for r in one], f"ours_{concurrency}": [[asdict(x) for x in b] for b in many],
                     f"ours_{concurrency}_wall_s": many_wall, "transformers": [asdict(r) for r in theirs]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(machine()["threads"])
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            results.append(bench_shape(name, args.tokens, args.frames, args.rounds, args.concurrency, Path(tmp)))
    end_load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    path = save("omni", {"results": results, "loadavg_start": load, "loadavg_end": end_load,
                         "published_first_packet_ms": PUBLISHED_FIRST_PACKET_MS})
    c = args.concurrency
    print(f"| shape | first audio: ours x1 | ours x{c} | transformers | ratio | audio s per wall s: ours x1 | "
          f"ours x{c} each / total | transformers |")
    for r in results:
        f, a = r["first_audio_s"], r["audio_per_wall_s"]
        print(f"| {r['shape']} | {f['ours_1'] * 1000:.0f} ms | {f[f'ours_{c}'] * 1000:.0f} ms | "
              f"{f['transformers'] * 1000:.0f} ms | {f['transformers'] / f['ours_1']:.0f}x | {a['ours_1']:.2f} | "
              f"{a[f'ours_{c}_each']:.2f} / {a[f'ours_{c}_total']:.2f} | {a['transformers']:.2f} |")
    print(f"load average {load} -> {end_load}; wrote {path}")


if __name__ == "__main__":
    main()
