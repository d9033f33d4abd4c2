"""Time to first token for one image on a Qwen3-VL checkpoint: our engine against transformers on the same
machine, and with the image cache warm.

    python benchmarks/make_checkpoint.py qwen3-vl-2b /tmp/bench/qwen3-vl-2b
    python benchmarks/bench_vl.py /tmp/bench/qwen3-vl-2b --name qwen3-vl-2b            # 1024x1024 image

Each TTFT runs from the encoded image (PNG bytes) and the question to the first generated token, so it
includes decoding and preprocessing the image, the vision tower and the prefill:
- ours, cold: a fresh engine (no encoder cache, no prefix cache), made before the clock starts: making it
  zero-fills its KV cache (1.7 s of a 30 s cold case for 2 GiB), which a server does once, not per request;
- ours, encoder cache warm: the same image in a new conversation (another system prompt, so the prefix cache
  cannot help): the vision tower is skipped, the prefill is not;
- ours, new question: the same image after the same system prompt with another question, as a new chat with
  the default system prompt asks it (the prefix cache holds the system prompt's and the image's KV, keyed by
  the image's content; only the question is prefilled);
- ours, next turn: the same conversation continued (the prefix cache holds the image's KV too);
- transformers: its Pillow image processor plus `generate(max_new_tokens=1)` on the same weights.
Both models stay loaded and the cases run in interleaved rounds after one warm-up of each; each figure is the
median of --repeats rounds, in wall seconds and in this process's CPU seconds (less sensitive to other work on
the machine). Ours also reports each case's parts (preprocessing, the engine).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, threads  # noqa: E402

from qwenstack.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.models.registry import load_model, parse_dtype  # noqa: E402
from qwenstack.multimodal.image_processing import ImageProcessor, ImageProcessorConfig  # noqa: E402
from qwenstack.multimodal.inputs import MultimodalInputs  # noqa: E402
from qwenstack.serving.images import preprocess_image  # noqa: E402

# Qwen3-VL's published preprocessor_config.json (pixel budget 256^2 .. 4096^2, patch 16, merge 2),
# written beside a random checkpoint that has none.
QWEN3_VL_PREPROCESSOR = {
    "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
GREEDY_ONE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


class IdDecoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""


def test_image_png(size: int, seed: int = 0) -> bytes:
    """A photo-like image (smooth gradients plus noise), PNG-encoded as a client would send it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))], axis=-1) * 80 + 128
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_ids(config: dict[str, Any], system: list[int], num_image_tokens: int, question: list[int]) -> list[int]:
    # <|im_start|>system ... <|im_end|> <|im_start|>user <vision_start> <image_pad>*n <vision_end> question
    # <|im_end|> <|im_start|>assistant, with the Qwen token ids but stand-in text tokens.
    im_start, im_end = 151644, 151645
    return ([im_start, 8948, 198] + system + [im_end, 198, im_start, 872, 198, config["vision_start_token_id"]]
            + [config["image_token_id"]] * num_image_tokens + [config["vision_end_token_id"]] + question
            + [im_end, 198, im_start, 77091, 198])


def next_turn(i: int) -> list[int]:
    """An answer of 24 tokens, then a new user question: what a follow-up appends to the conversation."""
    return [3000 + 31 * i + j for j in range(24)] + [151645, 198, 151644, 872, 198] + \
        [4000 + 17 * i + j for j in range(8)] + [151645, 198, 151644, 77091, 198]


def clocked(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds over all threads) of one call: on a machine shared with
    other work the wall time grows with the load, the CPU time much less."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# --- ours ---------------------------------------------------------------------------------------------


class Ours:
    def __init__(self, model: torch.nn.Module, processor: ImageProcessor, config: dict[str, Any]) -> None:
        self.model, self.processor, self.config = model, processor, config

    def engine(self) -> LLMEngine:
        return LLMEngine(self.model, IdDecoder(), [], EngineConfig(kv_cache_memory=2 * 2**30))

    def ttft(self, engine: LLMEngine, png: bytes, system: list[int], question: list[int],
             follow_up: list[int] = ()) -> tuple[float, dict]:
        """Seconds from the PNG bytes to the first token, and the parts (preprocess, the first-token step)."""
        start = time.perf_counter()
        image = preprocess_image(self.processor, png)
        preprocessed = time.perf_counter()
        ids = prompt_ids(self.config, system, image.num_tokens(self.processor.config.merge_size), question)
        ids += list(follow_up)  # a later turn: the answer so far and the next question
        engine.add_request(f"r{time.monotonic_ns()}", ids, GREEDY_ONE, multimodal=MultimodalInputs([image]))
        cached = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                cached = out.metrics.num_cached_tokens
        end = time.perf_counter()
        return end - start, {"preprocess_s": preprocessed - start, "engine_s": end - preprocessed,
                             "prompt_tokens": len(ids), "cached_tokens": cached}


# --- transformers ---------------------------------------------------------------------------------


def hf_ttft(hf: Any, processor: Any, config: dict[str, Any], png: bytes, system: list[int], question: list[int]) -> float:
    from PIL import Image

    start = time.perf_counter()
    image = Image.open(io.BytesIO(png))
    inputs = processor(images=[image], return_tensors="pt")
    merge = config["vision_config"]["spatial_merge_size"]
    n = int(inputs["image_grid_thw"].prod()) // merge**2
    ids = torch.tensor([prompt_ids(config, system, n, question)])
    with torch.inference_mode():
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=(ids == config["image_token_id"]).int(),
                    max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--image-size", type=int, default=1024, help="side of the square test image, pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    dtype = parse_dtype(args.dtype)
    config = json.loads((args.model_dir / "config.json").read_text())
    pre_path = args.model_dir / "preprocessor_config.json"
    if not pre_path.is_file():
        pre_path.write_text(json.dumps(QWEN3_VL_PREPROCESSOR, indent=2))
    processor = ImageProcessor(ImageProcessorConfig.from_pretrained(args.model_dir))
    ours = Ours(load_model(args.model_dir, dtype=dtype), processor, config)
    hf_run: Callable[[], float] | None = None
    png = test_image_png(args.image_size)
    systems = iter([[1000 + 7 * i + j for j in range(12)] for i in range(2 * args.repeats + 4)])
    question = [2000 + j for j in range(10)]
    if not args.no_transformers:
        import transformers

        settings = json.loads(pre_path.read_text())
        hf_processor = transformers.Qwen2VLImageProcessorPil(
            **{k: v for k, v in settings.items() if k not in ("processor_class", "image_processor_type")})
        cls = (transformers.Qwen3VLForConditionalGeneration if config["model_type"] == "qwen3_vl"
               else transformers.Qwen3VLMoeForConditionalGeneration)
        hf = cls.from_pretrained(args.model_dir, dtype=dtype).eval()
        cold_system = [1000 + j for j in range(12)]
        hf_run = lambda: hf_ttft(hf, hf_processor, config, png, cold_system, question)  # noqa: E731
    results: dict[str, Any] = {"model": args.name, "image_size": args.image_size, "png_bytes": len(png),
                               "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats,
                               "load_average_before": os.getloadavg()}

    engine = ours.engine()  # the engine of the warm cases; the first one also prepares the CPU linears
    conversation = next(systems)
    turns = iter(range(args.repeats + 2))
    questions = iter([[2500 + 13 * i + j for j in range(10)] for i in range(args.repeats + 2)])
    parts: dict[str, dict] = {}

    fresh: list[LLMEngine] = []

    def new_engine() -> None:  # the cold case's fresh engine, made before its clock starts (not part of a TTFT)
        fresh.append(ours.engine())

    def cold() -> None:
        parts["cold"] = ours.ttft(fresh.pop(), png, next(systems), question)[1]

    def warm() -> None:  # same image, new conversation: the encoder cache holds the image, the prefix cache not
        parts["encoder_cache_warm"] = ours.ttft(engine, png, next(systems), question)[1]

    def new_question() -> None:  # the prefix cache holds the system prompt's and the image's KV
        parts["new_question"] = ours.ttft(engine, png, conversation, next(questions))[1]

    def next_turn_of_conversation() -> None:  # the prefix cache holds the image's KV too
        parts["next_turn"] = ours.ttft(engine, png, conversation, question, next_turn(next(turns)))[1]

    cases: dict[str, Callable[[], Any]] = {"cold": cold}
    setups: dict[str, Callable[[], Any]] = {"cold": new_engine}
    if hf_run is not None:
        cases["transformers"] = hf_run
    cases |= {"encoder_cache_warm": warm, "new_question": new_question, "next_turn": next_turn_of_conversation}
    # Warm-up: one of each (first-call allocations, kernel builds, the CPU-linear choice); the conversation's
    # first turn fills both caches.
    ours.ttft(engine, png, conversation, question)
    for name, fn in cases.items():
        setups.get(name, lambda: None)()
        fn()
    # Interleaved rounds: a burst of load on the shared machine slows the cases it overlaps, not one side.
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for r in range(args.repeats):
        for name, fn in cases.items():
            setups.get(name, lambda: None)()
            times[name].append(clocked(fn))
            print(f"round {r} {name}: {times[name][-1][0]:.2f} s wall, {times[name][-1][1]:.2f} s CPU", flush=True)
    for name, pairs in times.items():
        results[f"{name}_ttft_s"] = statistics.median(w for w, _ in pairs)
        results[f"{name}_cpu_s"] = statistics.median(c for _, c in pairs)
    results["parts"] = parts
    stats = engine.runner.multimodal.cache.stats
    results["encoder_cache"] = {"hits": stats.hits, "misses": stats.misses}
    if hf_run is not None:
        hf_cold = results["transformers_ttft_s"]
        results["cold_vs_transformers"] = results["cold_ttft_s"] / hf_cold
        results["encoder_cache_warm_vs_transformers"] = results["encoder_cache_warm_ttft_s"] / hf_cold
        results["new_question_vs_transformers"] = results["new_question_ttft_s"] / hf_cold
        results["cold_cpu_vs_transformers"] = results["cold_cpu_s"] / results["transformers_cpu_s"]
        results["encoder_cache_warm_cpu_vs_transformers"] = results["encoder_cache_warm_cpu_s"] / results["transformers_cpu_s"]
    results["encoder_cache_warm_vs_cold"] = results["encoder_cache_warm_ttft_s"] / results["cold_ttft_s"]
    results["load_average_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in results.items() if k != "parts"}, indent=1, default=str))
    print(save(f"vl-{args.name}", results))


if __name__ == "__main__":
    main()
