"""`qwenstack imagine -p PROMPT -o out.png`: an image from text with Qwen-Image, in this process, with a
progress bar over the denoising steps."""
from __future__ import annotations

import argparse

from qwenstack.commands import Command
from qwenstack.commands._image_cli import add_image_options, run_image_command

EPILOG = """examples:
  qwenstack imagine -p "a red fox in the snow, watercolour" -o fox.png
  qwenstack imagine -p "a poster that says QWEN" --size 1328x1328 --seed 42 -n 2 -o poster.png"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    add_image_options(parser, "Qwen/Qwen-Image", "image.png")


def run(args: argparse.Namespace) -> int:
    return run_image_command(args, "generate", [])


COMMANDS = [Command("imagine", "Make an image from text with Qwen-Image (in this process, with a progress bar)",
                    add_arguments, run, order=33)]
