"""Options and helpers shared by several commands (no torch at import time)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenstack.engine.params import KV_CACHE_DTYPES
from qwenstack.markup import THINK_START

if TYPE_CHECKING:
    from qwenstack.engine.params import SamplingParams
    from qwenstack.llm import LLM

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Qwen3's recommended sampling (model cards), used when the checkpoint's generation_config.json names none.
QWEN3_SAMPLING = {
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20},  # thinking
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20},  # non-thinking
}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G' (binary), '2GB' (decimal), '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (examples: 2GiB, 512MiB, 1G, 1073741824)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive size")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be >= 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and memory")
    group.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="weight and activation dtype (auto: bfloat16)")
    group.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    group.add_argument("--max-model-len", type=positive_int, default=None, metavar="TOKENS",
                       help="context length limit (default: the model's, capped by the KV cache)")
    group.add_argument("--kv-cache-memory", type=parse_bytes, default=None, metavar="SIZE",
                       help="memory for the paged KV cache, e.g. 2GiB or 512MiB (default: 2GiB)")
    group.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                       help="the KV cache's element type: auto (the model's dtype) or fp8 (= fp8_e5m2, float8 e5m2: "
                            "twice the tokens in the same memory, at some precision)")
    group.add_argument("--quantization", default=None, metavar="METHOD", help="quantize the weights at load time")


def add_chat_template_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                        help="a Jinja chat template used instead of the checkpoint's (a file, or the template "
                             "itself), as vLLM's and llama.cpp's --chat-template")


def chat_template_of(args: argparse.Namespace) -> str | None:
    """The --chat-template's text (None: the checkpoint's own), read and checked now, before any loading."""
    from qwenstack.chat_template import read_chat_template

    value = getattr(args, "chat_template", None)
    return None if value is None else read_chat_template(value)


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config.json, else Qwen3's)")
    group.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None, help="0 turns it off")
    group.add_argument("--min-p", type=float, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--presence-penalty", type=float, default=None)
    default = max_tokens if max_tokens is not None else "until the model stops or the context is full"
    group.add_argument("--max-tokens", type=positive_int, default=max_tokens,
                       help=f"most tokens to generate per reply (default: {default})")
    group.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace, model_dir: Path, *, thinking: bool = True,
                    seed: int | None = None) -> "SamplingParams":
    """Command-line values over generation_config.json over Qwen3's recommendation for the mode."""
    from qwenstack.engine.params import SamplingParams
    from qwenstack.generation_config import generation_defaults

    values: dict[str, Any] = dict(QWEN3_SAMPLING[thinking])
    values.update(generation_defaults(model_dir))
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return SamplingParams(**values, max_tokens=args.max_tokens, stop=list(args.stop),
                          seed=args.seed if seed is None else seed)


def load_llm(args: argparse.Namespace) -> "LLM":
    """The model named by args.model (None: the bundled demo model, announced by qwenstack.llm.load)."""
    from qwenstack.llm import LLM

    options: dict[str, Any] = {}
    if getattr(args, "seed", None) is not None:
        options["seed"] = args.seed
    template = chat_template_of(args)
    llm = LLM(args.model, dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
              max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
              kv_cache_dtype=args.kv_cache_dtype,
              quantization=args.quantization, **options)
    if template is not None:
        llm.tokenizer.chat_template = template
    return llm


def starts_in_reasoning(prompt: str) -> bool:
    """Templates of thinking-only checkpoints open the think block in the prompt itself."""
    return prompt.rstrip().endswith(THINK_START)


def human_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"
