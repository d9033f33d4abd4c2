"""`qwenstack eval-quality [MODEL] --quantization int8,int4`: what quantization costs in quality
(perplexity, KL divergence, token agreement against the unquantized model; see qwenstack.evaluation.quality)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenstack.commands import Command
from qwenstack.commands._common import positive_int

ASSISTANT_HEADER = "<|im_start|>assistant\n"
AS_STORED = "as-stored"  # a pre-quantized checkpoint in its own format, against its dequantized weights
EPILOG = """examples:
  qwenstack eval-quality                                   # the demo model on its held-out text
  qwenstack eval-quality Qwen/Qwen3-0.6B --text wiki.txt --quantization int8,int4,int4-g32 --json q.json
  qwenstack eval-quality ./my-model --keep lm_head --prompts 32 --tokens 128
  qwenstack eval-quality ./Qwen3-8B-AWQ --quantization as-stored   # vs its exactly dequantized weights

Measures, per level, against the same model unquantized in --dtype:
  perplexity         on the held-out text (windows of --context tokens)
  mean KL            KL(unquantized || quantized) of the next-token distribution, nats per position
  top-1 match        positions where both models' most likely next token agree (teacher-forced)
  greedy agreement, step by step
                     the unquantized model decodes --tokens greedy tokens from each of --prompts prompts; the
                     fraction of those steps where the quantized model, reading the same text, picks the same
  free-running agreement
                     fraction of the --prompts x --tokens greedy tokens equal to the unquantized model's,
                     each model decoding on its own; plus the mean position of the first divergence"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("model", nargs="?", default=None, help="model id or directory (default: the demo model)")
    parser.add_argument("--quantization", default="int8,int4", metavar="LEVELS",
                        help="comma-separated levels: int8, int4, int4-g32, ..., or as-stored (a pre-quantized "
                             "checkpoint in its own format) (default: int8,int4)")
    parser.add_argument("--text", type=Path, default=None,
                        help="held-out text file (default: the model folder's heldout.txt, e.g. the demo model's)")
    parser.add_argument("--prompts", type=positive_int, default=16, help="greedy prompts (default: 16)")
    parser.add_argument("--tokens", type=positive_int, default=64, help="greedy tokens per prompt (default: 64)")
    parser.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per prompt (default: 32)")
    parser.add_argument("--context", type=positive_int, default=None,
                        help="perplexity window (default: the model's context, at most 512)")
    parser.add_argument("--max-text-tokens", type=positive_int, default=None,
                        help="score only the first N tokens of the text (default: all)")
    parser.add_argument("--prompt-end", default=None, metavar="TEXT",
                        help="end each prompt on this text (default: the chat assistant header when the text "
                             "has one, so prompts ask for a reply; 'none': anywhere)")
    parser.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                        help="keep matching layers in full precision, e.g. lm_head (repeatable; glob)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                        help="dtype of the baseline and of the activations (default: bfloat16)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")


def default_text(model_dir: Path) -> Path:
    path = model_dir / "heldout.txt"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no heldout.txt: give a held-out text with --text FILE")
    return path


def run(args: argparse.Namespace) -> int:
    from qwenstack.loading import load
    from qwenstack.evaluation.quality import evaluate_quality
    from qwenstack.quantization import parse_method

    levels = [level.strip() for level in args.quantization.split(",") if level.strip()]
    for level in levels:
        if level != AS_STORED:
            parse_method(level)  # a typo fails before the model loads
    # A pre-quantized checkpoint (FP8, AWQ, GPTQ): the baseline is its exactly dequantized weights, and the
    # AS_STORED level is the checkpoint run in its own format (what `serve` runs).
    loaded = load(args.model, dtype=args.dtype, device=args.device, quantization="dequantize") \
        if _prequantized(args.model) else load(args.model, dtype=args.dtype, device=args.device)
    prepared = {}
    if AS_STORED in levels:
        if not loaded.config.get("quantization_config"):
            raise ValueError(f"level '{AS_STORED}' needs a pre-quantized (FP8, AWQ, GPTQ) checkpoint")
        from qwenstack.models.registry import load_model

        native = load_model(loaded.path, dtype=args.dtype, device=args.device)
        prepared[AS_STORED] = (native, native.prequantized.summary())
    text_path = args.text or default_text(loaded.path)
    text = text_path.read_text(encoding="utf-8")
    token_ids = loaded.tokenizer.encode(text)  # special tokens written in the text become their ids
    if args.max_text_tokens:
        token_ids = token_ids[:args.max_text_tokens]
    prompt_end = args.prompt_end
    if prompt_end is None:
        prompt_end = ASSISTANT_HEADER if ASSISTANT_HEADER in text else "none"
    end_ids = None if prompt_end == "none" else loaded.tokenizer.encode(prompt_end.replace("\\n", "\n"))
    context = args.context or min(int(loaded.config.get("max_position_embeddings") or 512), 512)
    print(f"Evaluating {loaded.name}: {len(token_ids):,} tokens of {text_path.name}, levels {', '.join(levels)}",
          file=sys.stderr)
    report = evaluate_quality(loaded.model, token_ids, levels, model_name=loaded.name, context_len=context,
                              num_prompts=args.prompts, prompt_len=args.prompt_len, new_tokens=args.tokens,
                              keep=args.keep, prompt_end=end_ids, prompt_end_text=prompt_end,
                              progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True), prepared=prepared)
    print(report.describe())
    print()
    print(report.table())
    for level in report.levels[1:]:
        print(f"\n{level.summary}")
    if args.json is not None:
        args.json.write_text(json.dumps({**report.to_dict(), "text": str(text_path)}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _prequantized(model: str | None) -> bool:
    from qwenstack.config import read_config
    from qwenstack.resolve import resolve_model

    if model is None:
        return False
    try:
        return bool(read_config(resolve_model(model, allow_download=False)).get("quantization_config"))
    except Exception:  # not resolvable here: `load` reports it
        return False


COMMANDS = [Command("eval-quality", "Measure what quantization costs: perplexity, KL and token agreement",
                    add_arguments, run, order=60)]
