#!/usr/bin/env bash
# Every benchmark behind benchmarks/RESULTS.md, in one go, on a quiet machine (each writes benchmarks/out/*.json).
# Checkpoints are random weights of published shapes, written to $BENCH_DIR (about 12 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
B=${BENCH_DIR:-/tmp/bench}
mk() { [ -f "$B/$1/config.json" ] || python benchmarks/make_checkpoint.py "$1" "$B/$1" --tokenizer-from qwenstack/assets/demo-model; }
mk qwen3-0.6b; mk qwen3-0.6b-h64; mk qwen3-30b-a3b-4l; mk qwen3-next-80b-a3b-4l
python benchmarks/bench_load_memory.py "$B/qwen3-0.6b" --json benchmarks/out/load-memory-qwen3-0.6b.json
python benchmarks/bench_engine.py "$B/qwen3-0.6b" --name qwen3-0.6b
python benchmarks/bench_engine.py "$B/qwen3-30b-a3b-4l" --name qwen3-30b-a3b-4l --decode-tokens 24 --kv-cache-gib 0.5
python benchmarks/bench_quant.py "$B/qwen3-0.6b" --name qwen3-0.6b --levels bfloat16,int8,int4 --decode-tokens 32 --repeats 3
python benchmarks/bench_decode_loop.py "$B/qwen3-0.6b" --name qwen3-0.6b --levels bfloat16,int8
python benchmarks/bench_decode_loop.py "$B/qwen3-0.6b-h64" --name qwen3-0.6b-h64 --levels bfloat16 --decode-tokens 64
python benchmarks/bench_int4.py --name qwen3-0.6b --model "$B/qwen3-0.6b" --rounds 7
python benchmarks/bench_quant.py "$B/qwen3-30b-a3b-4l" --name qwen3-30b-a3b-4l --levels bfloat16,int8 --decode-tokens 24 --repeats 3
python benchmarks/bench_experts.py "$B/qwen3-30b-a3b-4l" --name qwen3-30b-a3b-4l --rounds 8
python benchmarks/bench_sampler.py --base HEAD --rows 16,64 --rounds 9 --name qwen3-vocab
python benchmarks/bench_agreement.py
python benchmarks/bench_next.py "$B/qwen3-next-80b-a3b-4l"
python benchmarks/bench_server.py "$B/qwen3-0.6b"
python benchmarks/bench_omni.py --tokens 64 --frames 80 --rounds 3 --concurrency 4
