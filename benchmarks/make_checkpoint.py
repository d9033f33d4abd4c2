"""Writes a random-weight checkpoint of a named shape in the Hugging Face layout, one shard at a time,
so even a large one never needs the whole model in memory.

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/qwen3-0.6b --dtype bfloat16 --shard-mb 600
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES  # noqa: E402

from qwenstack.models.registry import build_model, parse_dtype  # noqa: E402
from qwenstack.weights import _target_shape, parameter_sources  # noqa: E402


def checkpoint_layout(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    model = build_model(config, "meta")
    params = dict(model.named_parameters())
    out = []
    for name, layouts in parameter_sources(model).items():
        for source in layouts[0]:
            out.append((source.name, _target_shape(params[name].shape, source)))
    return out


def write_random_checkpoint(config: dict, out_dir: Path, dtype: torch.dtype, shard_bytes: int, seed: int = 0,
                            tokenizer_from: Path | None = None) -> Path:
    """With tokenizer_from, the output rows of ids the tokenizer does not have are zeroed, so the random model
    only generates decodable tokens (a server benchmark measures text) while keeping the published shape."""
    out_dir.mkdir(parents=True, exist_ok=True)
    known_vocab = None
    if tokenizer_from is not None and (tokenizer_from / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        known_vocab = Tokenizer.from_file(str(tokenizer_from / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    output_rows = "lm_head.weight" if not config.get("tie_word_embeddings") else "model.embed_tokens.weight"
    gen = torch.Generator().manual_seed(seed)
    layout = checkpoint_layout(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            elif name.endswith(("A_log", "dt_bias")):
                t = torch.rand(shape, generator=gen).to(dtype)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            if known_vocab is not None and name == output_rows:
                t[known_vocab:] = 0
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out_dir / "config.json").write_text(json.dumps({**config, "dtype": str(dtype).replace("torch.", "")}, indent=2))
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_from / f).is_file():
                (out_dir / f).write_bytes((tokenizer_from / f).read_bytes())
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shard-mb", type=int, default=600)
    parser.add_argument("--tokenizer-from", type=Path, default=None, help="copy tokenizer files from this model dir")
    args = parser.parse_args()
    write_random_checkpoint(SHAPES[args.shape], args.out_dir, parse_dtype(args.dtype), args.shard_mb * 2**20,
                            tokenizer_from=args.tokenizer_from)
    print(args.out_dir)


if __name__ == "__main__":
    main()
