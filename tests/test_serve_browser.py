"""End to end: Chromium (Debian's, driven by Playwright) uses the page against a live server on
127.0.0.1: upload, click, overlay, download; the downloaded mask equals the API's answer."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from conftest import test_image  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
# The README's screenshot is refreshed only on request, so a test run never changes tracked files.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve.png"


@pytest.fixture(scope="module")
def server(small_ckpt):
    """uvicorn in a thread on 127.0.0.1, an ephemeral port; stopped at the end (bounded waits)."""
    import uvicorn

    from segany import SAM
    from segany.serve import create_app

    config = uvicorn.Config(create_app(SAM(small_ckpt, device="cpu")), host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):  # up to 20 s
        if srv.started:
            break
        time.sleep(0.1)
    assert srv.started, "the server did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True, timeout=60_000)
        context = browser.new_context(viewport={"width": 1000, "height": 760}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        outside: list[str] = []

        def only_loopback(route):  # the page must work offline: nothing but this server
            if route.request.url.startswith("http://127.0.0.1:"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        pg.route("**/*", only_loopback)
        yield pg
        assert not outside, f"the page tried to reach {outside}"
        context.close()
        browser.close()


def _mask(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _click(page, x: float, y: float, w: int, h: int, button: str = "left") -> None:
    box = page.locator("#overlay").bounding_box()
    page.mouse.click(box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h, button=button)


def test_click_to_segment_end_to_end(server, page, tmp_path):
    import httpx

    h, w = 360, 480
    img = test_image(h, w)
    path = tmp_path / "shapes.png"
    cv2.imwrite(str(path), img)
    page.goto(server + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('status').textContent.includes('embedding cached')")
    assert page.locator("#stage").is_visible()

    # A positive click: the overlay shows the answer of the request the page sent.
    version = int(page.locator("#overlay").get_attribute("data-version"))
    with page.expect_response("**/prompt") as resp:
        _click(page, 150, 120, w, h)
    request_body = json.loads(resp.value.request.post_data)
    assert request_body["labels"] == [[1]] and abs(request_body["points"][0][0][0] - 150.5) < 1.5
    page.wait_for_function(f"+document.getElementById('overlay').dataset.version > {version + 1}")
    page.wait_for_function("document.getElementById('status').textContent.includes('mask(s)')")
    painted = page.evaluate("""() => { const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
    assert painted > 0

    # The same prompt through the API: the downloaded PNG is its best mask, pixel for pixel.
    image_id = httpx.post(server + "/api/images", content=path.read_bytes(), timeout=30).json()["id"]
    api = httpx.post(f"{server}/api/images/{image_id}/prompt", json=request_body, timeout=30).json()
    want = _mask(api["masks"][0]["rle"])
    assert page.locator("#candidates button").count() == (3 if request_body["multimask_output"] else 0)
    with page.expect_download() as dl:
        page.click("#dl-png")
    got = cv2.imread(str(dl.value.path()), cv2.IMREAD_GRAYSCALE)
    assert got.shape == (h, w)
    np.testing.assert_array_equal(got > 127, want)
    with page.expect_download() as dl:
        page.click("#dl-coco")
    coco = json.loads(Path(dl.value.path()).read_text())
    np.testing.assert_array_equal(_mask(coco["annotations"][0]["segmentation"]), want)
    with page.expect_download() as dl:
        page.click("#dl-yolo")
    lines = Path(dl.value.path()).read_text().splitlines()
    assert len(lines) <= 1 and all(ln.startswith("0 ") for ln in lines)

    # A right click adds a negative point to the same object; undo takes it away again.
    with page.expect_response("**/prompt") as resp:
        _click(page, 330, 230, w, h, button="right")
    assert json.loads(resp.value.request.post_data)["labels"] == [[1, 0]]
    with page.expect_response("**/prompt") as resp:
        page.click("#undo")
    assert json.loads(resp.value.request.post_data)["labels"] == [[1]]

    # Segment everything: the masks outlined in colours; then the screenshot for the README.
    with page.expect_response("**/everything"):
        page.click("#everything")
    page.wait_for_function("document.getElementById('status').textContent.includes('masks in')")
    page.click("#clear")
    with page.expect_response("**/prompt"):
        _click(page, 330, 230, w, h)
    page.wait_for_function("document.getElementById('status').textContent.includes('mask(s)')")
    shot = DOCS_SCREENSHOT if os.environ.get("SEGANY_UPDATE_DOCS") == "1" else tmp_path / "serve.png"
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0
