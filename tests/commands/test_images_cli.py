"""`qwenstack edit` and `qwenstack imagine` on tiny random Qwen-Image pipelines, in-process: the written
image equals the diffusers pipeline called directly, the progress bar counts every step, and mistakes are
one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image


from image_pipelines import build_image_pipelines, small_condition_sizes
from qwenstack.cli import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with pytest.MonkeyPatch.context() as mp:
        small_condition_sizes(mp)
        yield build_image_pipelines(tmp_path_factory.mktemp("qwen-image-cli"))


def _direct(model: Path, seed: int, **kwargs) -> np.ndarray:
    from diffusers import DiffusionPipeline

    from qwenstack.imagegen.pipelines import load_image_pipeline

    pipe = load_image_pipeline(str(model)).pipe
    assert isinstance(pipe, DiffusionPipeline)
    return np.asarray(pipe(prompt="a cat", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
                           num_inference_steps=3, generator=torch.Generator().manual_seed(seed), **kwargs).images[0])


def test_edit_writes_the_pipelines_image_with_a_progress_bar(dirs, tmp_path, capsys) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(a)
    Image.new("RGB", (32, 32), (20, 130, 30)).save(b)
    out = tmp_path / "out.png"
    status = main(["edit", str(a), str(b), "-p", "a cat", "-o", str(out), "-m", str(dirs["edit_plus"]),
                   "--size", "32x32", "--steps", "3", "--seed", "7"])
    assert status == 0
    err = capsys.readouterr().err
    assert "3/3 steps" in err and "1/3 steps" in err and "seed 7" in err
    expected = _direct(dirs["edit_plus"], 7, image=[Image.open(a).convert("RGB"), Image.open(b).convert("RGB")])
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_imagine_writes_n_images(dirs, tmp_path, capsys) -> None:
    out = tmp_path / "gen.webp"
    assert main(["imagine", "-p", "a cat", "-o", str(out), "-m", str(dirs["generate"]), "--size", "32x32",
                 "--steps", "3", "--seed", "1", "-n", "2"]) == 0
    assert Image.open(tmp_path / "gen-1.webp").format == "WEBP" and (tmp_path / "gen-2.webp").exists()
    assert "6/6 steps" in capsys.readouterr().err


def test_mistakes_are_one_line_errors(dirs, tmp_path, capsys) -> None:
    assert main(["imagine", "-p", "x", "-m", str(dirs["edit"]), "-o", str(tmp_path / "x.png")]) == 1
    assert "use `qwenstack edit`" in capsys.readouterr().err
    assert main(["imagine", "-p", "x", "-m", str(dirs["generate"]), "-o", str(tmp_path / "x.gif")]) == 1
    assert "--output must end in" in capsys.readouterr().err
