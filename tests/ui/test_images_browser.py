"""The chat page's image-edit flow in headless Chromium, against the real server (`create_app`) serving a tiny
random Qwen-Image-Edit-2509 pipeline (tests/image_pipelines.py): attach an image, ask for an edit, watch the
progress bar and a preview, get the edited image inline with a download link that gives the PNG, keep it
across a reload, and edit the made image again with a follow-up message (no new attachment)."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import BROWSER_TESTS, launch_chromium, page_expect, screenshot
from server_utils import BackgroundServer


pytestmark = BROWSER_TESTS

expect = page_expect()


STEP_DELAY_S = 0.03  # per transformer call: 40 steps x 2 (true CFG) ~ 2.4 s, long enough to see progress


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from image_pipelines import build_image_pipelines, small_condition_sizes
    from qwenstack.imagegen.pipelines import load_image_pipeline
    from qwenstack.serving.app import create_app
    from qwenstack.serving.config import ServerConfig

    root = tmp_path_factory.mktemp("ui-images")
    with pytest.MonkeyPatch.context() as mp:
        small_condition_sizes(mp)
        pipeline = load_image_pipeline(str(build_image_pipelines(root)["edit_plus"]), name="qwen-image-edit")
        transformer = pipeline.pipe.transformer
        forward = transformer.forward

        def slow_forward(*args, **kwargs):
            time.sleep(STEP_DELAY_S)
            return forward(*args, **kwargs)

        mp.setattr(transformer, "forward", slow_forward)
        app = create_app([], ServerConfig(api_key=None, ui_db_path=str(root / "chats.db")), image_pipeline=pipeline)
        with BackgroundServer(app) as running:
            yield running


@pytest.fixture
def page(server):
    with launch_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light",
                                      accept_downloads=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached(timeout=20_000)
        yield page
        context.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def test_attach_ask_for_an_edit_see_progress_and_download(page, tmp_path: Path) -> None:
    source = tmp_path / "red.png"
    Image.new("RGB", (48, 32), (220, 40, 40)).save(source)
    expect(page.get_by_test_id("model-select")).to_have_value("qwen-image-edit")
    expect(page.get_by_test_id("attach-button")).to_be_enabled()
    page.get_by_test_id("attach-input").set_input_files(str(source))
    expect(page.get_by_test_id("attachment-preview")).to_have_count(1)
    box = page.get_by_test_id("composer-input")
    box.fill("make it blue")
    box.press("Enter")

    answer = page.locator('[data-testid="message"][data-role="assistant"]').last
    progress = answer.get_by_test_id("image-progress")
    expect(progress).to_be_visible()
    expect(answer.get_by_test_id("image-preview")).to_be_visible()  # partial images while denoising
    expect(answer.locator('[data-testid="image-progress"]:not([data-progress="0"])')).to_be_attached()
    result = answer.get_by_test_id("image-result")
    expect(result).to_be_visible()
    expect(progress).to_have_count(0)
    expect(page.locator('[data-testid="app"][data-streaming="false"]')).to_be_attached()
    screenshot(page, "image-edit")

    link = answer.get_by_test_id("image-download")
    expect(link).to_have_attribute("download", "edited-1.png")
    with page.expect_download() as info:
        link.click()
    downloaded = tmp_path / "download.png"
    info.value.save_as(downloaded)
    image = Image.open(downloaded)
    assert image.format == "PNG" and image.size == (64, 64)  # auto: the pipeline's own size at the tests' small area
    src = result.get_attribute("src")
    assert base64.b64decode(src.split(",", 1)[1]) == downloaded.read_bytes()

    page.reload()  # the edit was saved with the conversation
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    expect(page.get_by_test_id("image-result")).to_have_count(1)

    # A follow-up without an attachment edits the latest image of the conversation: the one just made.
    box = page.get_by_test_id("composer-input")
    box.fill("now add a moon")
    box.press("Enter")
    expect(page.get_by_test_id("image-result")).to_have_count(2)
    expect(page.get_by_test_id("message-error")).to_have_count(0)
    second = page.get_by_test_id("image-result").last.get_attribute("src")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(second.split(",", 1)[1]))))
    assert pixels.shape == (64, 64, 3)


def test_a_refused_edit_is_shown_readably(page) -> None:
    box = page.get_by_test_id("composer-input")
    box.fill("an edit with no image anywhere")
    box.press("Enter")
    error = page.get_by_test_id("message-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("needs at least 1 image")
