"""`qwenstack plan MODEL`: parameters, memory, KV cache and expected decode speed from config.json alone."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenstack.commands import Command
from qwenstack.commands._common import positive_int
from qwenstack.engine.params import KV_CACHE_DTYPES

EPILOG = """examples:
  qwenstack plan Qwen/Qwen3-235B-A22B --context 262144 --quantization int4
  qwenstack plan qwen3-1t-hypothetical --context 262144          # a documented hypothetical 1T MoE
  qwenstack plan ./Qwen3-0.6B --quantization int8                # measures a short decode too
  qwenstack plan path/to/config.json --context 32768 --concurrency 8 --json plan.json
  qwenstack plan Qwen/Qwen3-235B-A22B --gpus 8xH200               # smallest TP (and EP) that fits, speed
  qwenstack plan Qwen/Qwen3-235B-A22B --cpus 4x512G --network 100gbe --quantization int8   # CPU nodes
  qwenstack plan Qwen/Qwen-Image-Edit-2509 --gpu H100 --size 1024x1024 --images 2   # an image model

MODEL is a config.json file, a model folder, a model id in the local Hugging Face cache, or a published
Qwen3 name from qwenstack's table (no download, no weights needed). The memory bandwidth is measured once
(a few seconds) and cached in ~/.cache/qwenstack/bandwidth.json ($QWENSTACK_CACHE_DIR moves it;
$QWENSTACK_BANDWIDTH_GBS sets it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("model", help="config file, model folder, cached model id or published name")
    parser.add_argument("--context", type=positive_int, default=None,
                        help="tokens of context per sequence (default: the config's max_position_embeddings)")
    parser.add_argument("--concurrency", type=positive_int, default=1, help="sequences held at once (default: 1)")
    parser.add_argument("--quantization", default=None, metavar="FORMAT",
                        help="weight format to plan for: int8, int4, int4-g32, fp8, float32 (default: bfloat16)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="activation and KV cache dtype (default: bfloat16)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="the KV cache's element type as the server takes it: auto (--dtype) or fp8 (half the "
                             "bytes)")
    parser.add_argument("--no-measure", action="store_true",
                        help="do not run a short decode even when the weights are present")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth figures and speed estimates")
    parser.add_argument("--refresh-bandwidth", action="store_true", help="measure the bandwidth again")
    parallel = parser.add_argument_group("parallel layouts (tensor, expert and data parallelism)")
    where = parallel.add_mutually_exclusive_group()
    where.add_argument("--gpus", default=None, metavar="NxGPU",
                       help="plan over N GPUs of a kind: 8xH200, 4xH100, 2xA100-80GB, 2xL40S, 4xRTX-4090, 2xL4")
    where.add_argument("--cpus", default=None, metavar="N[xRAM]",
                       help="plan over N CPU nodes like this one (its RAM and measured bandwidth), or of RAM each: "
                            "4, 4x512G")
    parallel.add_argument("--network", default="25gbe", choices=("10gbe", "25gbe", "100gbe"),
                          help="the network between CPU nodes (default: 25gbe)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the plan as JSON")
    image = parser.add_argument_group("image models (Qwen-Image, Qwen-Image-Edit, Qwen-Image-Edit-2509)")
    image.add_argument("--gpu", default=None, help="plan for this GPU: H200, H100, A100-80GB, A100-40GB, L40S, "
                                                    "RTX-4090, RTX-3090, L4 (default: this machine's)")
    image.add_argument("--size", default="1024x1024", help="output WIDTHxHEIGHT (default: 1024x1024)")
    image.add_argument("--images", type=positive_int, default=None, help="input images of an edit (default: 1)")
    image.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model card's)")
    image.add_argument("--no-cfg", action="store_true", help="without true CFG (one transformer pass per step)")


def run_image_plan(args: argparse.Namespace, model: object) -> int:
    from qwenstack.cost.image_planner import find_gpu, local_gpu, plan_image

    gpu = find_gpu(args.gpu) if args.gpu else local_gpu()
    if gpu is None:
        raise ValueError("no known GPU here: name one with --gpu (H200, H100, A100-80GB, A100-40GB, L40S, RTX-4090, "
                         "RTX-3090, L4)")
    width, _, height = args.size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise ValueError(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    plan = plan_image(model, gpu, int(width), int(height), args.images, args.steps, not args.no_cfg)
    print(plan.format())
    if args.json is not None:
        args.json.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


def run_parallel_plan(args: argparse.Namespace, source: object) -> int:
    from dataclasses import asdict

    from qwenstack.cost.bandwidth import cpu_bandwidth
    from qwenstack.cost.parallel import cpu_cluster, gpu_cluster, plan_parallel
    from qwenstack.cost.report import format_parallel

    if args.gpus:
        cluster = gpu_cluster(args.gpus)
    else:
        cluster = cpu_cluster(args.cpus, cpu_bandwidth(refresh=args.refresh_bandwidth), args.network)
    plan = plan_parallel(source, cluster, args.context, args.concurrency, args.quantization, args.dtype,
                         kv_cache_dtype=args.kv_cache_dtype)
    print(format_parallel(plan))
    if args.json is not None:
        record = asdict(plan)
        best = plan.smallest
        record.update(kind="parallel_plan", smallest=best.label if best else None, replicas=plan.replicas)
        args.json.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from qwenstack.cost.image_planner import image_model_for

    image_model = image_model_for(args.model)
    if image_model is not None:
        return run_image_plan(args, image_model)
    from qwenstack.cost.bandwidth import cpu_bandwidth, gpu_bandwidth
    from qwenstack.cost.planner import find_config, make_plan, measure_decode
    from qwenstack.cost.report import format_plan

    source = find_config(args.model)
    if args.gpus or args.cpus:
        return run_parallel_plan(args, source)
    bandwidth = gpu = None
    if not args.no_bandwidth:
        bandwidth = cpu_bandwidth(refresh=args.refresh_bandwidth)
        gpu = gpu_bandwidth(refresh=args.refresh_bandwidth)
    plan = make_plan(source, args.context, args.concurrency, args.quantization, args.dtype, bandwidth, gpu,
                     kv_cache_dtype=args.kv_cache_dtype)
    measurable = source.has_weights and plan.weights[plan.quantization].memory * 1.3 < plan.memory.ram_available
    if measurable and not args.no_measure:
        assert source.model_dir is not None
        quantization = None if plan.quantization == args.dtype else plan.quantization
        print(f"measuring a short decode of {source.model_dir} ...", file=sys.stderr, flush=True)
        plan.measured_tok_s, plan.measured_context = measure_decode(source.model_dir, quantization, args.dtype)
        if bandwidth is not None:  # an estimate at the context the measurement ran at, to set beside it
            at_measured = make_plan(source, plan.measured_context, 1, args.quantization, args.dtype, bandwidth,
                                    memory=plan.memory, short_context=plan.measured_context,
                                    kv_cache_dtype=args.kv_cache_dtype).speeds
            plan.speeds = sorted({s.context: s for s in plan.speeds + at_measured}.values(), key=lambda s: s.context)
    print(format_plan(plan))
    if args.json is not None:
        args.json.write_text(json.dumps(plan.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


COMMANDS = [Command("plan", "Estimate what a model needs (memory, KV cache) and how fast it decodes here",
                    add_arguments, run, order=65)]
