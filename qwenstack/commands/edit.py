"""`qwenstack edit IMG... -p PROMPT -o out.png`: edit one to three images with Qwen-Image-Edit-2509 (or
Qwen-Image-Edit), in this process, with a progress bar over the denoising steps."""
from __future__ import annotations

import argparse
from pathlib import Path

from qwenstack.commands import Command
from qwenstack.commands._image_cli import add_image_options, run_image_command

EPILOG = """examples:
  qwenstack edit photo.png -p "make the sky a sunset" -o sunset.png
  qwenstack edit person.png product.png -p "the person holds the product" --seed 7 -o ad.png
  qwenstack edit room.png --mask window.png -p "a garden outside" -o garden.png   # edit only where transparent"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("images", nargs="+", metavar="IMG", help="the image(s) to edit (1 to 3 for Edit-2509)")
    parser.add_argument("--mask", default=None,
                        help="a PNG the size of the first image: only its transparent area may change")
    add_image_options(parser, "Qwen/Qwen-Image-Edit-2509", "edited.png")


def run(args: argparse.Namespace) -> int:
    from qwenstack.multimodal.image_processing import _to_rgb, load_image

    images = [_to_rgb(load_image(Path(path).read_bytes())) for path in args.images]
    mask = load_image(Path(args.mask).read_bytes()) if args.mask else None
    return run_image_command(args, "edit", images, mask)


COMMANDS = [Command("edit", "Edit images with Qwen-Image-Edit (in this process, with a progress bar)",
                    add_arguments, run, order=32)]
