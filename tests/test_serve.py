"""``segany serve``: every endpoint and every bad-input case, in process (FastAPI's TestClient)."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from conftest import test_image  # noqa: E402
from segany import SAM  # noqa: E402
from segany.cli import main  # noqa: E402
from segany.serve import create_app  # noqa: E402
from segany.serve.command import is_loopback  # noqa: E402
from segany.serve.worker import ENCODE, EVERYTHING, PROMPT, ModelWorker, QueueFullError  # noqa: E402

IMG = test_image()  # 180 x 240 BGR
PNG = cv2.imencode(".png", IMG)[1].tobytes()
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def sam(small_ckpt):
    return SAM(small_ckpt, device="cpu")


@pytest.fixture(scope="module")
def client(small_ckpt):
    app = create_app(SAM(small_ckpt, device="cpu"), max_pixels=200 * 200 * 2, max_body_bytes=1 << 20, max_prompts=8)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def image_id(client):
    r = client.post("/api/images", files={"file": ("img.png", PNG, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def rle_to_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def check_error(r, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert body["field"] == field, body
    return body


# ------------------------------------------------------------------------------- endpoints

def test_health_models_docs(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and set(h["queue"]) == {"prompt", "encode", "everything"}
    m = client.get("/api/models").json()["models"]
    assert m[0]["img_size"] == 256 and m[0]["device"] == "cpu" and m[0]["active"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/images", "/api/images/{image_id}/prompt", "/api/images/{image_id}/everything",
            "/api/models", "/api/health"} <= set(paths)
    # Swagger UI from this server (the server often runs offline), every file served
    assets = re.findall(r'(?:src|href)="([^"]+)"', client.get("/docs").text)
    assert assets and all(a.startswith("/static/docs/") for a in assets), assets
    assert all(client.get(a).status_code == 200 for a in assets)


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    head = client.head("/")  # uptime checks use HEAD
    assert head.status_code == 200 and head.content == b""
    for name in ("app.js", "style.css", "index.html"):
        assert client.get(f"/static/{name}").status_code == 200
    for name in ("app.js", "style.css", "index.html"):  # works offline: nothing from another host
        assert "://" not in client.get(f"/static/{name}").text


@pytest.mark.parametrize("path", ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fservice.py",
                                  "/static//etc/passwd", "/static/%2fetc%2fpasswd"])
def test_no_path_escapes_static(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "import" not in r.text and "root:" not in r.text


def test_upload_multipart_and_raw_bytes_share_the_id(client, image_id):
    raw = client.post("/api/images", content=PNG, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200 and raw.json() == {"id": image_id, "width": 240, "height": 180}
    jpg = cv2.imencode(".jpg", IMG)[1].tobytes()
    other = client.post("/api/images", content=jpg, headers={"Content-Type": "application/octet-stream"}).json()
    assert other["id"] != image_id and (other["width"], other["height"]) == (240, 180)


PROMPTS = [
    dict(points=[[60, 50]], labels=[1]),
    dict(points=[[60, 50], [170, 120]], labels=[1, 1]),
    dict(points=[[[60, 50], [170, 120]]], labels=[[1, 0]]),
    dict(points=[100, 70]),
    dict(boxes=[50, 40, 130, 95]),
    dict(boxes=[[50, 40, 130, 95], [130, 90, 210, 160]]),
    dict(boxes=[50, 40, 130, 95], points=[[[80, 60]]], labels=[[1]]),
    dict(points=[[60, 50]], labels=[1], multimask_output=True),
    dict(points=[[60, 50], [170, 120]], multimask_output=True),
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_masks_equal_sam(client, image_id, sam, prompt):
    r = client.post(f"/api/images/{image_id}/prompt", json=prompt)
    assert r.status_code == 200, r.text
    body = r.json()
    kw = dict(prompt)
    if "boxes" in kw:
        kw["bboxes"] = kw.pop("boxes")
    ref = sam(IMG.copy(), **kw)[0]
    assert len(body["masks"]) == len(ref) > 0
    k = 3 if prompt.get("multimask_output") else 1
    for i, m in enumerate(body["masks"]):
        assert (m["prompt"], m["rank"]) == (i // k, i % k)
        np.testing.assert_array_equal(rle_to_mask(m["rle"]), ref.masks.data[i].numpy())
        assert m["score"] == pytest.approx(float(ref.boxes.conf[i]), abs=1e-5)
        assert m["area"] == int(ref.masks.data[i].sum())


def test_png_polygons_and_mask_input(client, image_id, sam):
    r = client.post(f"/api/images/{image_id}/prompt", json=dict(points=[[60, 50]], labels=[1], png=True, polygons=True))
    m = r.json()["masks"][0]
    png = cv2.imdecode(np.frombuffer(base64.b64decode(m["png"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(png > 127, rle_to_mask(m["rle"]))
    ref = sam(IMG.copy(), points=[[60, 50]], labels=[1])[0]
    np.testing.assert_allclose(np.asarray(m["polygon"]), ref.masks.xy[0], atol=0.01)
    # Refinement: the logits of that answer as mask_input, exactly as SAM(..., masks=logits).
    r2 = client.post(f"/api/images/{image_id}/prompt",
                     json=dict(points=[[60, 50]], labels=[1], mask_input=m["logits_id"]))
    assert r2.status_code == 200, r2.text
    ref2 = sam(IMG.copy(), points=[[60, 50]], labels=[1], masks=ref.low_res_logits[:1])[0]
    np.testing.assert_array_equal(rle_to_mask(r2.json()["masks"][0]["rle"]), ref2.masks.data[0].numpy())


def test_everything_equals_sam(client, image_id, sam):
    params = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, use_m2m=True)
    r = client.post(f"/api/images/{image_id}/everything", json={**params, "polygons": True})
    assert r.status_code == 200, r.text
    masks = r.json()["masks"]
    ref = sam(IMG.copy(), **params)[0]
    assert len(masks) == len(ref)
    for m, want in zip(masks, ref.masks.data.numpy()):
        np.testing.assert_array_equal(rle_to_mask(m["rle"]), want)
        assert {"predicted_iou", "stability_score", "crop_box", "polygon"} <= set(m)


def test_everything_leaves_the_score_filters_to_the_model():
    # The default model has its own segment-everything filters (conf_thres 0.6, stability 0.7):
    # a request that leaves them out gets the same masks as the Python API with no options.
    from segany.data import SyntheticDataset

    model = SAM(device="cpu")
    img = np.ascontiguousarray(SyntheticDataset(6, seed=3000)[1].image)
    app = create_app(model, max_pixels=1 << 20, max_body_bytes=1 << 22, max_prompts=8)
    with TestClient(app) as c:
        up = c.post("/api/images", files={"file": ("s.png", cv2.imencode(".png", img)[1].tobytes(), "image/png")})
        assert up.status_code == 200, up.text
        r = c.post(f"/api/images/{up.json()['id']}/everything", json={"points_per_side": 8})
    assert r.status_code == 200, r.text
    ref = model(img, points_per_side=8)[0]
    strict = model(img, points_per_side=8, pred_iou_thresh=0.88, stability_score_thresh=0.95)[0]
    assert len(ref) > len(strict)  # the image tells the two defaults apart
    assert len(r.json()["masks"]) == len(ref)
    for m, want in zip(r.json()["masks"], ref.masks.data.numpy()):
        np.testing.assert_array_equal(rle_to_mask(m["rle"]), want)


def test_everything_without_body_uses_defaults(client, image_id):
    r = client.post(f"/api/images/{image_id}/everything")
    assert r.status_code == 200 and isinstance(r.json()["masks"], list)


# ------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("endpoint", ["prompt", "everything"])
@pytest.mark.parametrize("bad_id", ["0" * 32, "nope", "..%2f..%2fetc"])
def test_unknown_image_id_is_404(client, endpoint, bad_id):
    r = client.post(f"/api/images/{bad_id}/{endpoint}", json={"points": [[1, 1]]} if endpoint == "prompt" else {})
    assert r.status_code == 404
    if r.json().get("field") is not None:
        assert r.json()["field"] == "image_id"


@pytest.mark.parametrize("body,field", [
    ({"points": "here"}, "points"),
    ({"points": [[1, 2, 3]]}, "points"),
    ({"points": [[1000, 10]]}, "points"),
    ({"points": [[10, 10]], "labels": [7]}, "labels"),
    ({"points": [[10, 10]], "labels": [1, 1]}, "labels"),
    ({"labels": [1]}, "points"),
    ({}, "points"),
    ({"boxes": [10, 10, 5, 5]}, "boxes"),
    ({"boxes": [1, 2, 3]}, "boxes"),
    ({"boxes": [[1, 1, 9, 9]], "points": [[1, 1], [2, 2]]}, None),
    ({"points": [[10, 10]], "mask_input": "deadbeef"}, "mask_input"),
    ({"points": [[10, 10]], "multimask_output": "maybe"}, "multimask_output"),
    ({"points": [[10, 10]], "png": "yes"}, "png"),  # strict: no coercion of strings
    ({"boxes": ["10", 10, 100, 100]}, "boxes"),
    ({"points": [[10, 10]], "labels": [True]}, "labels"),
    ({"points": [[10, 10]], "colour": "red"}, "colour"),
    ({"points": [[i, i] for i in range(9)]}, "points"),
])
def test_malformed_prompt_is_422_naming_the_field(client, image_id, body, field):
    detail = check_error(client.post(f"/api/images/{image_id}/prompt", json=body), 422, field)["detail"]
    assert "bboxes" not in detail  # the API's name for boxes is boxes


def test_prompt_warnings_use_the_api_field_names(client, image_id):
    """Warnings are reworded like errors: the engine's ``bboxes`` is the request's ``boxes``."""
    r = client.post(f"/api/images/{image_id}/prompt", json={"boxes": [-10, -10, 100, 100]})
    assert r.status_code == 200, r.text
    warnings = r.json()["warnings"]
    assert warnings == ["boxes extend past the 240x180 image; clipped to it"], warnings


def test_invalid_json_is_422(client, image_id):
    url = f"/api/images/{image_id}/prompt"
    check_error(client.post(url, content=b"{not json", headers=JSON), 422, "body")
    check_error(client.post(url, content=b'{"points": [[1, 1]]}\xff', headers=JSON), 422, "body")  # not UTF-8
    check_error(client.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=JSON), 422, "body")  # too deep


def test_error_answers_are_those_the_openapi_document_gives(client, image_id):
    from segany.serve.schemas import ErrorBody

    paths = client.get("/openapi.json").json()["paths"]
    for path, codes in (("/api/images", {"413", "415", "422", "503"}),
                        ("/api/images/{image_id}/prompt", {"404", "413", "415", "422", "503"}),
                        ("/api/images/{image_id}/everything", {"404", "413", "415", "422", "503"})):
        responses = paths[path]["post"]["responses"]
        assert codes <= set(responses), path
        for code in codes:
            ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody"), (path, code)
    for r in (client.post(f"/api/images/{image_id}/prompt", json={"points": "x"}),       # pydantic's 422
              client.post(f"/api/images/{image_id}/prompt", json={"points": [[-5, 5]]}),  # the engine's 422
              client.post("/api/images/0123/prompt", json={"points": [[5, 5]]}),          # 404
              client.post("/api/images", content=b"not an image")):                      # 415
        assert r.status_code >= 400 and ErrorBody.model_validate(r.json()).detail


def test_mask_input_of_another_image_is_422(client, image_id):
    other = client.post("/api/images", content=cv2.imencode(".png", test_image(seed=3))[1].tobytes()).json()["id"]
    lid = client.post(f"/api/images/{other}/prompt", json={"points": [[5, 5]]}).json()["masks"][0]["logits_id"]
    body = check_error(client.post(f"/api/images/{image_id}/prompt", json={"points": [[5, 5]], "mask_input": [lid]}),
                       422, "mask_input")
    assert "another image" in body["detail"]


def test_count_mismatch_with_mask_input_names_the_field(client, image_id):
    lid = client.post(f"/api/images/{image_id}/prompt", json={"points": [[5, 5]]}).json()["masks"][0]["logits_id"]
    body = client.post(f"/api/images/{image_id}/prompt", json={"points": [[5, 5], [9, 9]], "mask_input": [lid]})
    detail = check_error(body, 422)["detail"]
    assert "mask_input: 1" in detail and "masks" not in detail


@pytest.mark.parametrize("body,field", [({"points_per_side": 0}, "points_per_side"),
                                        ({"crop_n_layers": 9}, "crop_n_layers"),
                                        ({"pred_iou_thresh": 2}, "pred_iou_thresh"),
                                        ({"points_stride": 8}, "points_stride"),
                                        ({"points_per_batch": 1}, "points_per_batch"),
                                        ({"points_per_side": "8"}, "points_per_side"),
                                        ({"points_per_side": 40, "crop_n_layers": 1}, "points_per_side")])
def test_bad_everything_params_are_422(client, image_id, body, field):
    check_error(client.post(f"/api/images/{image_id}/everything", json=body), 422, field)


def test_prompt_body_that_is_not_json_is_415(client, image_id):
    body = json.dumps({"points": [[60, 50]], "labels": [1]})
    for headers in ({"Content-Type": "text/plain"}, {}):
        r = client.post(f"/api/images/{image_id}/prompt", content=body, headers=headers)
        check_error(r, 415, "body")
        assert "application/json" in r.json()["detail"]
    assert client.post(f"/api/images/{image_id}/prompt", content=body, headers=JSON).status_code == 200


@pytest.mark.parametrize("data", [b"not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_not_an_image_is_415(client, data):
    check_error(client.post("/api/images", content=data, headers={"Content-Type": "image/png"}), 415, "file")


def test_format_that_cannot_be_sized_before_decoding_is_415(client):
    # A Radiance .hdr (OpenCV reads it, Pillow cannot): its size is unknown until decoded, and a
    # few MB can decode to gigabytes, so the server refuses it without decoding.
    hdr = cv2.imencode(".hdr", np.zeros((400, 400, 3), np.float32))[1].tobytes()
    r = client.post("/api/images", content=hdr, headers={"Content-Type": "application/octet-stream"})
    check_error(r, 415, "file")
    assert "PNG, JPEG" in r.json()["detail"]


def test_multipart_without_file_field_is_422(client):
    check_error(client.post("/api/images", data={"image": "x"}, files={"other": ("a.png", PNG)}), 422, "file")


def test_image_over_pixel_cap_is_413(client):
    big = cv2.imencode(".png", np.zeros((300, 300, 3), np.uint8))[1].tobytes()  # 90k pixels > 80k cap
    check_error(client.post("/api/images", content=big), 413, "file")


def test_size_cap_errors_name_the_fix(client, monkeypatch):
    """A 413 says what to do: downscale / send less, or raise the server's cap (by its option name)."""
    from PIL import Image

    big = cv2.imencode(".png", np.zeros((300, 300, 3), np.uint8))[1].tobytes()  # 90k pixels > 80k cap
    body = check_error(client.post("/api/images", content=big), 413, "file")
    assert "300x300" in body["detail"] and "downscale" in body["detail"] and "max_pixels=" in body["detail"]
    # Over twice Pillow's own limit, Pillow refuses from the header: the same message, not Pillow's
    # "decompression bomb DOS attack".
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    body = check_error(client.post("/api/images", content=big), 413, "file")
    assert "90000 pixels" in body["detail"] and "max_pixels=" in body["detail"] and "DOS" not in body["detail"]
    blob = b"\0" * ((1 << 20) + 1)
    assert "max_body_mb=" in check_error(client.post("/api/images", content=blob), 413, "body")["detail"]
    chunked = (b"\0" * (1 << 16) for _ in range(20))
    assert "max_body_mb=" in check_error(client.post("/api/images", content=chunked), 413, "body")["detail"]


def test_body_over_size_cap_is_413(client, image_id):
    blob = b"\0" * ((1 << 20) + 1)
    check_error(client.post("/api/images", content=blob), 413, "body")
    check_error(client.post("/api/images", files={"file": ("a.png", blob)}), 413, "body")

    def chunks():  # no Content-Length: the cap is enforced while reading
        for _ in range(20):
            yield b"\0" * (1 << 16)

    check_error(client.post("/api/images", content=chunks()), 413, "body")
    big_json = b'{"points": [[1, 1]], "pad": "' + b"x" * (1 << 20) + b'"}'
    check_error(client.post(f"/api/images/{image_id}/prompt", content=big_json, headers=JSON), 413, "body")


def test_json_bodies_have_a_cap_of_their_own(sam):
    """A prompt body is refused past 1 MiB even where uploads may be 32 MiB: FastAPI parses JSON on
    the event loop, so a 30 MB body held every other request for seconds."""
    from segany.serve.limits import JSON_BODY_BYTES

    with TestClient(create_app(sam, max_body_bytes=32 << 20)) as c:
        image_id = c.post("/api/images", files={"file": ("img.png", PNG, "image/png")}).json()["id"]
        url = f"/api/images/{image_id}/prompt"
        big = b'{"points": [[1, 1]], "pad": "' + b"x" * JSON_BODY_BYTES + b'"}'
        assert "far smaller" in check_error(c.post(url, content=big, headers=JSON), 413, "body")["detail"]
        chunks = (big[i: i + 4096] for i in range(0, len(big), 4096))  # no Content-Length
        check_error(c.post(url, content=chunks, headers=JSON), 413, "body")
        # the largest request the default caps allow (64 objects of 64 points) is far under it
        points = [[[float(x), float(y)] for x in range(8) for y in range(8)]] * 64
        assert len(json.dumps({"points": points})) < JSON_BODY_BYTES // 4
        assert c.post(url, json={"points": [[10.5, 20.5]]}).status_code == 200


def test_wrong_method_and_route_are_json_4xx(client, image_id):
    assert check_error(client.get("/api/images"), 405) and client.get("/api/images").headers["allow"] == "POST"
    assert client.delete(f"/api/images/{image_id}/prompt").headers["allow"] == "POST"
    check_error(client.get("/api/nothing"), 404)
    for path in ("/api/health", "/api/models"):  # HEAD wherever GET
        head = client.head(path)
        assert head.status_code == 200 and head.content == b""


# ------------------------------------------------------------------------------- worker and CLI

def test_worker_serves_prompts_before_queued_long_jobs():
    w = ModelWorker(max_pending=4, max_everything=1)
    gate, order = threading.Event(), []
    try:
        first = w.submit(EVERYTHING, gate.wait, 10)  # occupies the model thread
        time.sleep(0.05)
        jobs = [w.submit(EVERYTHING, order.append, "everything"), w.submit(ENCODE, order.append, "encode"),
                w.submit(PROMPT, order.append, "prompt1"), w.submit(PROMPT, order.append, "prompt2")]
        with pytest.raises(QueueFullError):
            w.submit(PROMPT, order.append, "one too many")
        gate.set()
        for j in [first, *jobs]:
            j.result(timeout=10)
        assert order == ["prompt1", "prompt2", "encode", "everything"]
        with pytest.raises(QueueFullError):  # only max_everything segment-everything jobs may wait
            gate.clear()
            w.submit(PROMPT, gate.wait, 10)  # busy again, so the next jobs wait
            time.sleep(0.05)
            w.submit(EVERYTHING, order.append, "a")
            w.submit(EVERYTHING, order.append, "b")
    finally:
        gate.set()
        w.stop()


def test_full_encode_queue_refuses_uploads_before_decoding_them(small_ckpt, monkeypatch):
    # Waiting encode jobs hold decoded images: with the queue full an upload is a 503 (with
    # Retry-After) and is never decoded; the worker caps waiting encodes on its own.
    from segany.serve.service import SegmentService

    decoded = []
    monkeypatch.setattr(SegmentService, "decode_upload", lambda self, data: decoded.append(data))

    def full(self, priority):
        raise QueueFullError("8 image encoding jobs are waiting; retry shortly")

    monkeypatch.setattr(ModelWorker, "check_room", full)
    app = create_app(SAM(small_ckpt, device="cpu"), max_pixels=200 * 200 * 2, max_body_bytes=1 << 20, max_prompts=8)
    with TestClient(app) as c:
        r = c.post("/api/images", files={"file": ("x.png", PNG, "image/png")})
    assert r.status_code == 503 and r.headers.get("retry-after") == "1" and "encoding" in r.json()["detail"]
    assert not decoded
    monkeypatch.undo()
    w = ModelWorker(max_pending=10, max_encode=1)
    gate = threading.Event()
    try:
        w.submit(PROMPT, gate.wait, 10)  # occupies the model thread
        time.sleep(0.05)
        w.submit(ENCODE, lambda: None)
        with pytest.raises(QueueFullError, match="1 image encoding jobs"):
            w.check_room(ENCODE)
        w.check_room(PROMPT)  # other jobs still have room
    finally:
        gate.set()
        w.stop()


def test_worker_passes_exceptions_to_the_caller():
    w = ModelWorker()
    try:
        with pytest.raises(ZeroDivisionError):
            w.submit(PROMPT, lambda: 1 / 0).result(timeout=10)
        assert w.submit(PROMPT, lambda: 42).result(timeout=10) == 42  # the thread survived
    finally:
        w.stop()


def test_cli_serve_help_and_bad_options(capsys):
    assert main(["serve", "--help"]) == 0
    assert "pip install segany[serve]" in capsys.readouterr().out
    assert main(["serve", "port=70000"]) == 2
    assert main(["serve", "prot=80"]) == 2
    assert "serve" in (main([]) == 0 and capsys.readouterr().out)


def test_cli_serve_without_fastapi_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "uvicorn" else real(n, *a))
    assert main(["serve", "model=whatever.pt"]) == 1
    assert "pip install segany[serve]" in capsys.readouterr().err


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_the_server_keeps_the_callers_current_image(small_ckpt):
    model = SAM(small_ckpt, device="cpu")
    model.predictor.set_image(test_image(seed=4))
    mine = model.predictor.image
    with TestClient(create_app(model, max_pixels=1 << 20)) as c:
        image_id = c.post("/api/images", content=PNG).json()["id"]
        assert c.post(f"/api/images/{image_id}/prompt", json={"points": [[5, 5]]}).status_code == 200
    assert model.predictor.image is mine  # the server's jobs ran on a predictor of their own


def test_uploads_decoding_in_other_threads_do_not_eat_a_prompts_warnings():
    """Request threads decode uploads while the model thread records a prompt's warnings:
    ``warnings.catch_warnings`` in both raced (it is not thread-safe), and a prompt lost its note."""
    import threading
    import warnings

    import cv2

    from segany import SAM
    from segany.serve.app import _load_model
    from segany.serve.service import SegmentService

    svc = SegmentService(*_load_model(SAM(), "cpu"))
    entry = svc.encode("a" * 32, np.random.default_rng(0).integers(0, 255, (150, 200, 3), np.uint8))
    big = cv2.imencode(".png", np.random.default_rng(1).integers(0, 255, (600, 800, 3), np.uint8))[1].tobytes()
    filters = list(warnings.filters)
    stop = threading.Event()

    def decode_uploads():
        while not stop.is_set():
            svc.decode_upload(big)

    thread = threading.Thread(target=decode_uploads)
    thread.start()
    try:
        answers = [svc.prompt(entry, dict(bboxes=[-10, -10, 500, 500]), False, False, False) for _ in range(40)]
    finally:
        stop.set()
        thread.join()
    assert all(any("clipped" in w for w in a["warnings"]) for a in answers)
    assert warnings.filters == filters


def test_cli_serve_refuses_a_bad_log_level_before_loading():
    from segany.cli import main

    assert main(["serve", "log_level=bogus"]) == 2


def test_cli_serve_on_a_taken_port_fails_before_loading_the_model(monkeypatch, capsys):
    import socket

    import segany.serve.app as app_module

    monkeypatch.setattr(app_module, "create_app", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", f"port={port}"]) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "port=0" in err


def test_cli_serve_port_0_prints_the_port_it_got_and_serves_there(small_ckpt):
    """The banner names the real port, and the server answers there (a process of its own)."""
    import os
    import re
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "segany", "serve", f"model={small_ckpt}", "port=0",
                             "log_level=warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = proc.stdout.readline()  # printed once the model has loaded and the port is bound
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", banner)
        assert url and url.group(1) != "0", banner + proc.stderr.read() if proc.poll() is not None else banner
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url.group(0) + "api/health", timeout=5) as r:
                    assert r.status == 200 and json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_takes_an_ipv6_host_in_brackets_as_text(capsys):
    assert main(["serve", "host=[::1]", "port=70000"]) == 2  # the port is the error, not the host
    assert "port=70000" in capsys.readouterr().err
