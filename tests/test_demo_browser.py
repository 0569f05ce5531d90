"""The demo in a real browser: Playwright drives Debian's Chromium through the Sample, Edit and Compare tabs of the
demo with the shipped models (as `vartk demo` serves it, on a free loopback port) and checks the images and costs
that come back. Each test screenshots its tab; VARTK_DEMO_SCREENSHOTS=docs/ writes them where docs/demo.md shows
them:

    VARTK_DEMO_SCREENSHOTS=docs/ python -m pytest tests/test_demo_browser.py
"""
import io
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vartk.loading import BUILTIN_MODELS
from vartk.metrics import psnr

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright never downloads a browser here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1100, "height": 900}
TIMEOUT_MS = 120_000  # a page action or one sampling call, on a busy 2-core machine
COST = r"[0-9.]+ s, 10\.0 transformer forwards per image \(68\.00 tokens per forward\), KV cache ([0-9.]+) (KiB|MiB)"

if not CHROMIUM.is_file():
    pytest.skip(f"needs Debian's Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e '.[dev]')")
pytest.importorskip("gradio", reason="needs gradio (pip install -e '.[demo]')")


@pytest.fixture(scope="module")
def backend():
    from vartk.demo import DemoBackend

    return DemoBackend(["default", "default-gpt"], "cpu")


@pytest.fixture(scope="module")
def demo_url(backend):
    """The demo of both shipped models, served on a free loopback port while the module's tests run."""
    from vartk.demo import build_demo, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(backend)
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, demo_url):
    """A fresh page of the demo (each test starts from the page as it loads)."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(demo_url)
    yield page
    page.close()


@pytest.fixture
def screenshot(page, tmp_path):
    """screenshot(name): the whole page as name.png in $VARTK_DEMO_SCREENSHOTS, else in the test's tmp folder."""
    folder = Path(os.environ.get("VARTK_DEMO_SCREENSHOTS") or tmp_path)

    def take(name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=path, full_page=True)
        return path

    return take


def loaded_image(page, img) -> np.ndarray:
    """The pixels an <img> element shows, once loaded: uint8 [H, W, 3], fetched from its source."""
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    response = page.request.get(img.evaluate("img => img.currentSrc"))
    assert response.ok, response.status
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def assert_a_sample(image: np.ndarray) -> None:
    """A 64 px image of the emoji models, not blank (not one colour)."""
    assert image.shape == (64, 64, 3)
    assert image.reshape(-1, 3).std(axis=0).max() > 10


def sliders(page) -> dict[str, tuple[float, float]]:
    """The visible sliders: label -> (value, maximum)."""
    return {label.removeprefix("range slider for "): (float(value), float(maximum)) for label, value, maximum in
            page.locator("input[type=range]").filter(visible=True).evaluate_all(
                "els => els.map(e => [e.getAttribute('aria-label'), e.value, e.max])")}


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the visible dropdown labelled `label` (a tab once shown keeps its controls, hidden)."""
    page.get_by_label(label, exact=True).filter(visible=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def paint_stroke(page, canvas, length: int = 100) -> None:
    """A horizontal brush stroke across the middle of the editor's canvas: one move, the brush draws the line (each
    move is rendered, slowly without a GPU)."""
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - length / 2, y)
    page.mouse.down()
    page.mouse.move(x + length / 2, y, steps=1)
    page.mouse.up()


def test_sample_tab_generates_shows_costs_follows_the_model_and_sends_to_edit(page, screenshot):
    page.locator("#sample-run").wait_for()
    saved = json.loads((BUILTIN_MODELS["default"] / "model_index.json").read_text())["sampling_defaults"]
    assert sliders(page)["guidance scale"][0] == saved["guidance_scale"] != 3  # the model's own, not default-gpt's
    assert sliders(page)["top-k (0 = off)"] == (saved["top_k"], 512)  # up to its vocabulary
    choose(page, "model", "default-gpt")
    page.wait_for_function("() => document.querySelector('input[aria-label=\"range slider for guidance scale\"]')"
                           ".value === '3'")
    saved_gpt = json.loads((BUILTIN_MODELS["default-gpt"] / "model_index.json").read_text())["sampling_defaults"]
    assert sliders(page)["top-k (0 = off)"] == (saved_gpt["top_k"], 512) != (saved["top_k"], 512)
    kv_cache = page.get_by_label(re.compile("^KV cache")).filter(visible=True)
    assert kv_cache.is_disabled()  # next-token models keep their own cache
    choose(page, "model", "default")
    page.wait_for_function("() => !document.querySelector('input[aria-label^=\"KV cache\"]').disabled")
    choose(page, "class", "smileys_emotion")

    page.locator("#sample-run").click()
    gallery = page.locator("#sample-gallery img")
    page.wait_for_function("() => document.querySelectorAll('#sample-gallery img').length === 4")
    samples = [loaded_image(page, gallery.nth(i)) for i in range(4)]
    for sample in samples:
        assert_a_sample(sample)
    assert not np.array_equal(samples[0], samples[1])
    assert re.fullmatch(COST, page.locator("#sample-cost").inner_text().strip())
    screenshot("demo-sample")

    gallery.nth(1).click()
    page.locator("#sample-send").click()
    page.get_by_role("tab", name="Edit", selected=True).wait_for()
    page.locator("#edit-canvas").get_by_text("Upload an image").wait_for(state="detached")  # it holds the sample


def test_edit_tab_inpaints_the_painted_region_of_an_upload(page, screenshot, backend, tmp_path):
    upload = tmp_path / "smiley.png"
    backend.generate("default", "smileys_emotion", 1, 6.0, 20, 0.9, 0)[0][0].save(upload)
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-canvas").get_by_text("Upload an image").wait_for()
    # the editor drops a file given before its two drawing surfaces (image and crop canvases) are set up
    page.locator("#edit-canvas canvas").nth(1).wait_for(state="attached")
    page.locator("#edit-canvas input[type=file]").set_input_files(upload)
    page.locator("#edit-canvas").get_by_text("Upload an image").wait_for(state="detached")
    paint_stroke(page, page.locator("#edit-canvas canvas").first)
    page.locator("#edit-run").click()
    edited = loaded_image(page, page.locator("#edit-result img"))
    assert_a_sample(edited)
    cost = page.locator("#edit-cost").inner_text().strip()
    regenerated = re.fullmatch(r"inpaint: regenerated (\d+) of 256 tokens; " + COST, cost)
    assert regenerated and 0 < int(regenerated.group(1)) < 256, cost
    changed = np.abs(edited.astype(int) - np.asarray(Image.open(upload)).astype(int)).max(axis=2) > 32  # [64, 64]
    assert changed[24:40, 16:48].mean() > changed[:8].mean()  # the stroke's middle band changed, the top less
    screenshot("demo-edit")


def test_compare_tab_shows_both_images_their_costs_and_the_psnr(page, screenshot):
    page.get_by_role("tab", name="Compare").click()
    choose(page, "class", "smileys_emotion")
    page.locator("#compare-run").click()
    image_a = loaded_image(page, page.locator("#compare-a img"))
    image_b = loaded_image(page, page.locator("#compare-b img"))
    assert_a_sample(image_a)
    assert_a_sample(image_b)
    full, scalekv = (re.fullmatch(COST, page.locator(f"#compare-cost-{side}").inner_text().strip()) for side in "ab")
    assert full and scalekv
    kib = lambda match: float(match.group(1)) * (1024 if match.group(2) == "MiB" else 1)  # noqa: E731
    assert kib(scalekv) < kib(full) / 2  # the full cache against ScaleKV with a tenth of it
    shown = page.locator("#compare-psnr").inner_text().strip()
    assert shown == f"PSNR between A and B: {psnr(image_a, image_b):.2f} dB"
    screenshot("demo-compare")
