"""End to end: Chromium (Debian's, driven by Playwright) uses the page against a live server on
127.0.0.1: upload, click, overlay, download; the downloaded mask equals the API's answer."""

from __future__ import annotations

import contextlib
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
    from segany import SAM
    from segany.serve import create_app

    with _serve(create_app(SAM(small_ckpt, device="cpu"))) as url:
        yield url


@contextlib.contextmanager
def _serve(app):
    """uvicorn in a thread on 127.0.0.1, an ephemeral port; stopped at the end (bounded waits)."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):  # up to 20 s
        if srv.started:
            break
        time.sleep(0.1)
    assert srv.started, "the server did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
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


def test_api_docs_pages_work_offline(server, page):
    """/docs renders the API (Swagger UI loads from this server: the page fixture refuses every
    other address)."""
    page.goto(server + "/docs")
    page.locator(".swagger-ui .info .title", has_text="segany").wait_for()
    page.locator(".opblock-summary-path", has_text="/api/images/{image_id}/prompt").first.wait_for()


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


# ------------------------------------------------------------------------------- page behaviour

H, W = 180, 240


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "shapes.png"
    cv2.imwrite(str(path), test_image(H, W))
    return path


def _open(page, server: str, path: Path) -> None:
    page.goto(server + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('status').textContent.includes('embedding cached')")


def _status(page) -> str:
    return page.text_content("#status")


def test_box_dragged_past_the_image_edge_ends_there(server, page, shapes):
    _open(page, server, shapes)
    box = page.locator("#overlay").bounding_box()
    page.mouse.move(box["x"] + 100, box["y"] + 80)
    page.mouse.down()
    with page.expect_response("**/prompt") as resp:  # released outside the image, below right
        page.mouse.move(box["x"] + box["width"] + 40, box["y"] + box["height"] + 40, steps=4)
        page.mouse.up()
    np.testing.assert_allclose(json.loads(resp.value.request.post_data)["boxes"], [[100, 80, W, H]], atol=0.6)
    page.wait_for_function("document.getElementById('status').textContent.includes('mask(s)')")
    assert page.evaluate("down") is None  # no drag left open: hovering draws no box
    page.click("#clear")
    # Dragged up-left, and a middle click (scrolling, not a prompt) adds no point.
    page.mouse.click(box["x"] + 20, box["y"] + 20, button="middle")
    page.mouse.move(box["x"] + 200, box["y"] + 150)
    page.mouse.down()
    with page.expect_response("**/prompt") as resp:
        page.mouse.move(box["x"] + 50, box["y"] + 30, steps=4)
        page.mouse.up()
    sent = json.loads(resp.value.request.post_data)
    np.testing.assert_allclose(sent["boxes"], [[50, 30, 200, 150]], atol=0.6)
    assert "points" not in sent


def test_evicted_image_is_uploaded_again_and_the_click_answered(small_ckpt, page, shapes, tmp_path):
    import httpx

    from segany import SAM
    from segany.serve import create_app

    with _serve(create_app(SAM(small_ckpt, device="cpu"), max_images=1)) as url:
        _open(page, url, shapes)
        other = tmp_path / "other.png"
        cv2.imwrite(str(other), test_image(H, W)[::-1].copy())
        httpx.post(url + "/api/images", content=other.read_bytes(), timeout=30)  # evicts the page's image
        uploads: list[str] = []
        page.on("request", lambda r: uploads.append(r.url) if r.url.endswith("/api/images") else None)
        _click(page, 60, 50, W, H)
        page.wait_for_function("document.getElementById('status').textContent.includes('mask(s)')")
        assert len(uploads) == 1 and page.evaluate("S.masks.length") == 1


def test_the_same_file_opened_again_is_uploaded_again(server, page, shapes):
    _open(page, server, shapes)
    with page.expect_request("**/api/images"):
        page.set_input_files("#file", str(shapes))
    page.wait_for_function("document.getElementById('status').textContent.includes('embedding cached')")


def test_failed_prompt_shows_the_error_and_drops_the_stale_mask(server, page, shapes):
    _open(page, server, shapes)
    with page.expect_response("**/prompt"):
        _click(page, 60, 50, W, H)
    page.wait_for_function("document.getElementById('status').textContent.includes('mask(s)')")
    assert page.evaluate("S.masks.length") == 1 and not page.is_disabled("#dl-png")

    def busy(route):
        route.fulfill(status=503, content_type="application/json",
                      body=json.dumps({"detail": "64 jobs are waiting for the model; retry shortly", "field": None}))

    page.route("**/prompt", busy)
    try:
        with page.expect_response("**/prompt"):
            _click(page, 170, 120, W, H)
        page.wait_for_function("document.getElementById('status').textContent.includes('retry shortly')")
    finally:
        page.unroute("**/prompt", busy)
    assert page.get_attribute("#status", "class") == "error"
    # The old mask answered other prompts: neither shown nor downloadable now.
    assert page.evaluate("S.masks.length") == 0 and page.is_disabled("#dl-png")


def test_a_file_the_browser_cannot_show_is_refused_before_uploading(server, page, tmp_path):
    from PIL import Image

    tif = tmp_path / "scan.tif"
    Image.fromarray(test_image(H, W)[:, :, ::-1].copy()).save(tif)  # Pillow reads it; Chromium cannot show it
    page.goto(server + "/")
    uploads: list[str] = []
    page.on("request", lambda r: uploads.append(r.url) if r.url.endswith("/api/images") else None)
    page.set_input_files("#file", str(tif))
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "scan.tif" in _status(page) and "cannot display" in _status(page) and not uploads


def test_downloads_keep_the_file_name_and_thin_masks(server, page, shapes):
    from segany.engine.export import yolo_line

    _open(page, server, shapes)
    line = np.zeros((H, W), np.uint8)
    line[20, 30:41] = 1  # a 1-pixel line: a 2-vertex polygon
    rle = mask_utils_encode(line)
    answer = {"image_id": "x", "width": W, "height": H, "multimask_output": False, "warnings": [], "time_ms": 1,
              "masks": [{"score": 0.9, "area": 11, "bbox": [30, 20, 10, 0], "rle": rle,
                         "polygon": [[30.0, 20.0], [40.0, 20.0]], "prompt": 0, "rank": 0}]}
    page.route("**/prompt", lambda route: route.fulfill(status=200, content_type="application/json",
                                                         body=json.dumps(answer)))
    try:
        with page.expect_response("**/prompt"):
            _click(page, 35, 20, W, H)
        page.wait_for_function("document.getElementById('status').textContent.includes('mask(s)')")
    finally:
        page.unroute("**/prompt")
    with page.expect_download() as dl:
        page.click("#dl-yolo")
    want = yolo_line(0, np.array([[30.0, 20.0], [40.0, 20.0]]) / [W, H])
    assert Path(dl.value.path()).read_text().splitlines() == [want]
    with page.expect_download() as dl:
        page.click("#dl-coco")
    coco = json.loads(Path(dl.value.path()).read_text())
    assert coco["images"][0]["file_name"] == "shapes.png"  # as on disk: COCO tools find the image by it
    np.testing.assert_array_equal(_mask(coco["annotations"][0]["segmentation"]), line.astype(bool))


def test_undo_after_segment_everything_brings_back_the_prompts(server, page, shapes):
    _open(page, server, shapes)
    with page.expect_response("**/prompt"):
        _click(page, 60, 50, W, H)
    with page.expect_response("**/prompt"):
        _click(page, 170, 120, W, H)
    page.wait_for_function("document.getElementById('status').textContent.includes('mask(s)')")
    answer = {"image_id": "x", "width": W, "height": H, "time_ms": 1,  # as the server's, in a moment
              "masks": [{"score": 0.9, "area": 1, "bbox": [0, 0, 1, 1], "polygon": [[0, 0], [1, 0], [1, 1]],
                         "rle": mask_utils_encode(np.eye(H, W, dtype=np.uint8))}]}
    page.route("**/everything", lambda route: route.fulfill(status=200, content_type="application/json",
                                                             body=json.dumps(answer)))
    try:
        with page.expect_response("**/everything"):
            page.click("#everything")
        page.wait_for_function("document.getElementById('status').textContent.includes('masks in')")
    finally:
        page.unroute("**/everything")
    with page.expect_response("**/prompt") as resp:
        page.click("#undo")
    assert json.loads(resp.value.request.post_data)["labels"] == [[1, 1]]
    # Unticking "candidates" asks again at once, for one mask.
    with page.expect_response("**/prompt") as resp:
        page.uncheck("#multimask")
    assert json.loads(resp.value.request.post_data)["multimask_output"] is False
    page.check("#multimask")


def test_undo_of_everything_run_on_no_prompts_goes_back_to_prompting(server, page, shapes):
    _open(page, server, shapes)
    with page.expect_response("**/everything"):
        page.click("#everything")
    page.wait_for_function("document.getElementById('status').textContent.includes('masks in')")
    assert "active" in page.get_attribute("#everything", "class")
    page.click("#undo")  # nothing to ask the server: the masks go, and so does everything's state
    page.wait_for_function("!document.getElementById('status').textContent.includes('masks in')")
    assert "active" not in (page.get_attribute("#everything", "class") or "")
    assert page.evaluate("S.mode") == "prompt" and page.evaluate("S.masks.length") == 0


def mask_utils_encode(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}
