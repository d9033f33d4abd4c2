"""`qwenstack generate [MODEL] PROMPT`: offline generation for one prompt, or a file of them, batched."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qwenstack.commands import Command
from qwenstack.commands._common import add_chat_template_option, add_model_options, add_sampling_options, sampling_params, starts_in_reasoning

EPILOG = """examples:
  qwenstack generate "The capital of France is"
  qwenstack generate Qwen/Qwen3-0.6B "Explain KV caches" --chat --no-think --max-tokens 200
  qwenstack generate --file prompts.txt --json --temperature 0 > outputs.json
  echo "Once upon a time" | qwenstack generate -"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("inputs", nargs="*", metavar="[MODEL] PROMPT",
                        help="model id or directory (optional), then the prompt ('-' reads it from stdin)")
    parser.add_argument("--model", "-m", default=None, help="the model, as an alternative to the first positional")
    parser.add_argument("--file", "-f", type=Path, default=None,
                        help="read prompts from a file, one per line (\\n in a line is a newline)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--no-think", action="store_true", help="turn thinking off (with --chat)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--json", action="store_true", help="print the outputs as a JSON list")
    add_sampling_options(parser, max_tokens=256)
    add_model_options(parser)
    add_chat_template_option(parser)


def _model_and_prompts(args: argparse.Namespace, parser_error: Any) -> tuple[str | None, list[str]]:
    inputs = list(args.inputs)
    model = args.model
    if args.file is not None:
        if len(inputs) > 1 or (inputs and model):
            parser_error("with --file, give at most a MODEL positional")
        model = model or (inputs[0] if inputs else None)
        lines = args.file.read_text(encoding="utf-8").splitlines()
        prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    else:
        if not inputs or len(inputs) > 2 or (len(inputs) == 2 and model):
            parser_error("give a PROMPT, optionally preceded by a MODEL (or use --file)")
        if len(inputs) == 2:
            model = inputs[0]
        prompts = [inputs[-1]]
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    if not prompts:
        parser_error(f"{args.file} holds no prompts")
    return model, prompts


def run(args: argparse.Namespace) -> int:
    def parser_error(message: str) -> None:
        raise ValueError(message)

    args.model, prompts = _model_and_prompts(args, parser_error)
    from qwenstack.commands._common import load_llm
    from qwenstack.serving.parsers import parse_chat_output

    llm = load_llm(args)
    thinking = not args.no_think
    params = sampling_params(args, llm.loaded.path, thinking=thinking)
    params.n = args.n
    params.validate()
    if args.chat:
        texts = []
        for prompt in prompts:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}]
            texts.append(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            enable_thinking=thinking))
    else:
        texts = prompts
    outputs = llm.generate(texts, params)
    records: list[dict[str, Any]] = []
    for prompt, text, out in zip(prompts, texts, outputs):
        for sample in out.outputs:
            record: dict[str, Any] = {"prompt": prompt, "text": sample.text, "finish_reason": sample.finish_reason,
                                      "prompt_tokens": len(out.prompt_token_ids),
                                      "completion_tokens": len(sample.token_ids)}
            if args.chat:
                message = parse_chat_output(sample.text, starts_in_reasoning=starts_in_reasoning(text))
                record["reasoning_content"] = message.reasoning
                record["content"] = message.content
            records.append(record)
    if args.json:
        json.dump(records, sys.stdout, ensure_ascii=False, indent=2)
        print()
        return 0
    for i, record in enumerate(records):
        if len(records) > 1:
            print(f"--- [{i}] {record['prompt'][:60]!r}")
        if args.chat and record["reasoning_content"]:
            print(f"<think>\n{record['reasoning_content']}\n</think>\n")
        print((record["content"] or "") if args.chat else record["text"], flush=True)
    return 0


COMMANDS = [Command("generate", "Generate text for a prompt or a file of prompts (offline, batched)",
                    add_arguments, run, order=30, rest="inputs")]
