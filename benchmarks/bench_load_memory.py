"""Peak resident memory while loading a checkpoint, against the checkpoint's size on disk.

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/bench/qwen3-0.6b --shard-mb 500
    python benchmarks/bench_load_memory.py /tmp/bench/qwen3-0.6b

Each load runs in a fresh process so ru_maxrss measures that load alone (the interpreter and torch
import are counted too, as a user would see them).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import resource, sys, time, json
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
if sys.argv[2] == "qwenstack":
    from qwenstack.models.registry import load_model
    model = load_model(sys.argv[1], dtype=torch.bfloat16)
else:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_rss": peak, "rss_before_load": base, "param_bytes": params, "seconds": elapsed}))
"""


def measure(model_dir: Path, loader: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), loader], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description="peak memory while loading")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--with-transformers", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = checkpoint_bytes(args.model_dir)
    results = {"checkpoint_bytes": size, "shards": len(list(args.model_dir.glob("*.safetensors")))}
    loaders = ["qwenstack"] + (["transformers"] if args.with_transformers else [])
    for loader in loaders:
        r = measure(args.model_dir, loader)
        r["peak_over_checkpoint"] = r["peak_rss"] / size
        results[loader] = r
        print(f"{loader:12s} peak RSS {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_over_checkpoint']:.2f}x the "
              f"checkpoint ({size / 2**30:.2f} GiB in {results['shards']} shards), load {r['seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
