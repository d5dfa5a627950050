"""Tests of segany.engine.sources: every kind of source becomes H×W×3 uint8 BGR."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segany.engine.sources import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    count_sources,
    expand_sources,
    iter_sources,
    load_image,
)
from segany.errors import ConfigError, ImageError, ImageNotFoundError, SkippedImageWarning

H, W = 40, 60


def _bgr() -> np.ndarray:
    """A test image whose channels all differ, so a swapped channel order shows."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = 30  # B
    img[..., 1] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]  # G
    img[..., 2] = 220  # R
    return img


def _assert_bgr(img: np.ndarray, shape: tuple[int, int] = (H, W)) -> None:
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8 and img.shape == (*shape, 3) and img.flags.c_contiguous


# ---------------------------------------------------------------- files


def test_png_is_exact_and_jpg_is_close(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), _bgr())
    cv2.imwrite(str(tmp_path / "a.jpg"), _bgr())
    png = load_image(tmp_path / "a.png")
    _assert_bgr(png)
    np.testing.assert_array_equal(png, _bgr())
    jpg = load_image(str(tmp_path / "a.jpg"))
    _assert_bgr(jpg)
    diff = np.abs(jpg.astype(int) - cv2.imread(str(tmp_path / "a.jpg")).astype(int))
    assert diff.max() <= 3  # Pillow's and OpenCV's JPEG decoders may round differently


def test_large_files_decode_exactly_band_by_band(tmp_path: Path) -> None:
    """Pixels leave Pillow a band of rows at a time (~4 MB each): a 2000 × 1500 image goes in
    three bands, the last one shorter, and an EXIF-turned one is turned before."""
    bgr = np.random.default_rng(3).integers(0, 256, (2000, 1500, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "big.png"), bgr)
    np.testing.assert_array_equal(load_image(tmp_path / "big.png"), bgr)
    rgba = np.dstack([bgr[..., ::-1], np.full(bgr.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(load_image(Image.fromarray(rgba, "RGBA")), bgr)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90° clockwise
    Image.fromarray(np.ascontiguousarray(bgr[..., ::-1])).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "turned.png"), np.rot90(bgr, k=-1))


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    color = _bgr().astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "c16.png"), color)
    np.testing.assert_array_equal(load_image(tmp_path / "c16.png"), _bgr())
    # Every 16-bit value, as a grayscale and as a colour file and as arrays: the pixels that
    # cv2.imread gives (what Meta's predictor is fed), whichever way the data comes.
    gray = np.arange(1 << 16, dtype=np.uint32).reshape(256, 256).astype(np.uint16)
    bgr16 = np.dstack([gray, gray[::-1], gray.T])
    for name, data in (("g16.png", gray), ("bgr16.png", bgr16)):
        cv2.imwrite(str(tmp_path / name), data)
        expected = cv2.imread(str(tmp_path / name))
        for source in (tmp_path / name, data):
            np.testing.assert_array_equal(load_image(source), expected)


def test_grayscale_rgba_and_palette_png(tmp_path: Path) -> None:
    gray = _bgr()[..., 1]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(load_image(tmp_path / "g.png"), np.dstack([gray] * 3))

    rgb = _bgr()[..., ::-1]
    rgba = np.dstack([rgb, np.full((H, W), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), _bgr())  # alpha dropped

    pal = Image.fromarray(np.ascontiguousarray(rgb)).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(
        load_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB"))[..., ::-1]
    )
    pal.save(tmp_path / "pt.png", transparency=0)
    np.testing.assert_array_equal(
        load_image(tmp_path / "pt.png"), np.asarray(pal.convert("RGB"))[..., ::-1]
    )


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (255, 0, 0)  # left half red
    rgb[:, W // 2 :] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90° clockwise
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    _assert_bgr(out, (W, H))  # shape swapped
    # rotating clockwise moves the left (red) half to the top
    assert out[2, H // 2, 2] > 200 and out[2, H // 2, 0] < 60
    assert out[-3, H // 2, 0] > 200 and out[-3, H // 2, 2] < 60


def test_in_memory_pil_images_are_taken_as_their_pixels_are(tmp_path: Path) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    opened = Image.open(tmp_path / "rot.jpg")
    turned = opened.rotate(-90, expand=True)  # the user turned it already; the tag stays in .info
    assert load_image(opened).shape == (H, W, 3)  # stored pixels, as np.asarray(opened) has them
    assert load_image(turned).shape == (W, H, 3)  # not turned a second time
    assert load_image(tmp_path / "rot.jpg").shape == (W, H, 3)  # a file: displayed orientation


def test_opencv_fallback_for_formats_pillow_cannot_read(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "x.hdr"), np.full((H, W, 3), 0.5, np.float32))
    out = load_image(tmp_path / "x.hdr")
    _assert_bgr(out)
    assert abs(int(out[0, 0, 0]) - 128) <= 2
    # Float files OpenCV decodes (colour PFM, float RGB TIFF) are 0..1 data, scaled like arrays.
    colour = np.zeros((H, W, 3), np.float32)
    colour[..., 2] = 0.8
    for name in ("c.pfm", "f.tif"):
        cv2.imwrite(str(tmp_path / name), colour)
        out = load_image(tmp_path / name)
        assert out[..., 2].min() == 204 and out[..., :2].max() == 0


def test_file_values_that_need_a_guess_are_refused(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "bright.tif"), np.full((H, W, 3), 200.0, np.float32))  # OpenCV reads it
    Image.fromarray(np.full((H, W), 200.0, np.float32)).save(tmp_path / "gray.tif")  # Pillow reads it
    Image.fromarray(np.array([[-1000, 5, 70000]], np.int32)).save(tmp_path / "wide.tif")
    for name, why in [("bright.tif", "values must lie in 0..1"), ("gray.tif", "values must lie in 0..1"),
                      ("wide.tif", r"values -1000..70000, outside the 0..65535")]:
        with pytest.raises(ImageError, match=why) as info:
            load_image(tmp_path / name)
        assert "could decode" not in str(info.value)  # it was read: its values are refused


# ---------------------------------------------------------------- in-memory images


def test_empty_pil_images_are_refused() -> None:
    for size in ((0, 5), (5, 0)):
        with pytest.raises(ImageError, match="empty image of size"):
            load_image(Image.new("RGB", size))


def test_pil_rgb_and_rgba() -> None:
    rgb = np.ascontiguousarray(_bgr()[..., ::-1])
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), _bgr())
    rgba = Image.fromarray(np.dstack([rgb, np.zeros((H, W), np.uint8)]), "RGBA")
    np.testing.assert_array_equal(load_image(rgba), _bgr())
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb).convert("L"))[..., 0],
                                  np.asarray(Image.fromarray(rgb).convert("L")))


def test_ndarray_inputs() -> None:
    bgr = _bgr()
    out = load_image(bgr)  # documented: a copy, so later edits of the caller's array do not reach results
    assert np.array_equal(out, bgr) and not np.shares_memory(out, bgr)
    batch = np.stack([bgr, bgr])
    assert not any(np.shares_memory(img, batch) for _, img in iter_sources(batch))
    gray = bgr[..., 1]
    np.testing.assert_array_equal(load_image(gray), np.dstack([gray] * 3))
    np.testing.assert_array_equal(load_image(bgr.astype(np.uint16) * 257), bgr)
    np.testing.assert_array_equal(load_image(bgr.astype(np.float32) / 255), bgr)
    bgra = np.dstack([bgr, np.full((H, W), 9, np.uint8)])
    np.testing.assert_array_equal(load_image(bgra), bgr)
    np.testing.assert_array_equal(load_image(bgr.astype(np.int64)), bgr)


def test_tensor_rgb_to_bgr() -> None:
    bgr = _bgr()
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)
    np.testing.assert_array_equal(load_image(rgb.float() / 255), bgr)
    np.testing.assert_array_equal(load_image(rgb[None].float() / 255), bgr)
    np.testing.assert_array_equal(load_image(rgb), bgr)  # uint8 tensor


def test_batch_tensor_yields_each_image() -> None:
    bgr = _bgr()
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1).float() / 255
    batch = torch.stack([rgb, 1 - rgb])
    items = list(iter_sources(batch))
    assert [name for name, _ in items] == ["image0", "image1"]
    np.testing.assert_array_equal(items[0][1], bgr)
    np.testing.assert_array_equal(items[1][1], 255 - bgr)
    assert count_sources(batch) == 2
    with pytest.raises(ImageError, match="a batch of 2"):
        load_image(batch)


# ---------------------------------------------------------------- many images


def test_directory_glob_and_list(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "b.jpg"), _bgr())
    cv2.imwrite(str(tmp_path / "a.png"), _bgr())
    cv2.imwrite(str(tmp_path / ".hidden.png"), _bgr())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "sub" / "c.png"), _bgr())  # not recursive

    names = [n for n, _ in iter_sources(tmp_path)]
    assert names == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    assert count_sources(tmp_path) == 2

    names = [n for n, _ in iter_sources(str(tmp_path / "*.png"))]
    assert names == [str(tmp_path / "a.png")]

    source = [tmp_path / "b.jpg", _bgr(), Image.fromarray(_bgr()), tmp_path]
    items = list(iter_sources(source))
    assert [n for n, _ in items] == [
        str(tmp_path / "b.jpg"), "image1", "image2", str(tmp_path / "a.png"), str(tmp_path / "b.jpg")
    ]
    assert all(img.shape == (H, W, 3) for _, img in items)
    assert count_sources(source) == 5
    assert len(expand_sources(source)) == 5

    gen = (x for x in [_bgr(), _bgr()])
    assert count_sources(gen) is None  # not consumed
    assert [n for n, _ in iter_sources(gen)] == ["image0", "image1"]


def _write_video(path: Path, n: int) -> None:
    fourcc = "mp4v" if path.suffix == ".mp4" else "MJPG"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (64, 48))
    assert writer.isOpened(), f"this OpenCV build cannot write {fourcc}"
    for i in range(n):
        writer.write(np.full((48, 64, 3), i * 20, np.uint8))
    writer.release()


@pytest.mark.parametrize("name", ["v.mp4", "v.avi"])
def test_video_frames_and_stride(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _write_video(path, 10)
    assert path.suffix in VIDEO_EXTENSIONS
    frames = list(iter_sources(path))
    assert [n for n, _ in frames] == [f"{path}:frame_{i}" for i in range(10)]
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for _, f in frames)
    means = [float(f.mean()) for _, f in frames]
    assert all(abs(m - 20 * i) < 8 for i, m in enumerate(means))
    strided = list(iter_sources(path, vid_stride=3))
    assert [n for n, _ in strided] == [f"{path}:frame_{i}" for i in (0, 3, 6, 9)]
    assert count_sources(path) == 10 and count_sources(path, vid_stride=3) == 4
    # a directory ignores videos; a glob takes them
    assert count_sources(str(tmp_path / "*")) == 10
    with pytest.raises(ImageNotFoundError, match="video"):
        list(iter_sources(tmp_path))
    with pytest.raises(ImageError, match="is a video"):
        load_image(path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@contextlib.contextmanager
def _http_server(handler, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A server on 127.0.0.1 (an ephemeral port, no proxy in the way) → its base URL; stopped after."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_url_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), _bgr())
    with _http_server(functools.partial(_QuietHandler, directory=str(tmp_path)), monkeypatch) as base:
        np.testing.assert_array_equal(load_image(f"{base}/a.png"), _bgr())
        # Spaces and non-ASCII letters, as a browser or curl sends them; and already encoded.
        for name in ("b b.png", "ü.png"):
            cv2.imwrite(str(tmp_path / name), _bgr())
            np.testing.assert_array_equal(load_image(f"{base}/{name}"), _bgr())
        np.testing.assert_array_equal(load_image(f"{base}/b%20b.png"), _bgr())
        assert [n for n, _ in iter_sources([f"{base}/a.png"])] == [f"{base}/a.png"]
        with pytest.raises(ImageError, match="missing.png"):
            load_image(f"{base}/missing.png")


# ---------------------------------------------------------------- errors


def test_urls_are_sent_encoded_as_a_browser_does() -> None:
    from segany.engine.urls import encoded_url as _encoded_url

    assert _encoded_url("http://h:81/b b/ü.png?q=ä b#x y") == "http://h:81/b%20b/%C3%BC.png?q=%C3%A4%20b#x%20y"
    assert _encoded_url("http://bücher.de/a.png") == "http://xn--bcher-kva.de/a.png"  # the host in IDNA form
    already = "https://x.org/a%20b.png?x=1&y=2#f"
    assert _encoded_url(already) == already


def test_a_cut_off_url_download_is_an_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class CutOff(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b"\x89PNG" + b"\0" * 996)  # a fifth of what was promised

    with _http_server(CutOff, monkeypatch) as base:
        with pytest.raises(ImageError, match=r"could not download image .*/a\.png: the connection closed after 1000 bytes"):
            load_image(f"{base}/a.png")


def test_missing_empty_and_corrupt_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageNotFoundError, match="nope.jpg") as info:
        load_image(missing)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ImageNotFoundError, match="nope.jpg"):
        list(iter_sources([missing]))

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png is empty .*not a readable image"):
        load_image(empty)

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, np.uint8).tobytes())
    with pytest.raises(ImageError, match=r"corrupt\.jpg is not a readable image"):
        load_image(corrupt)


def test_unreadable_listed_files_are_skipped_named_ones_raise(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), _bgr())
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(tmp_path / "c.png"), _bgr())
    for source in (tmp_path, str(tmp_path / "*.*"), [tmp_path]):
        with pytest.warns(SkippedImageWarning, match=r"skipped, unreadable: .*b\.jpg is not a readable image") as rec:
            names = [n for n, _ in iter_sources(source)]
        assert rec[0].filename == __file__  # the line that iterates, not segany's
        assert names == [str(tmp_path / "a.png"), str(tmp_path / "c.png")]
    for source in (tmp_path / "b.jpg", [tmp_path / "a.png", str(tmp_path / "b.jpg")]):
        with pytest.raises(ImageError, match=r"b\.jpg is not a readable image"):
            list(iter_sources(source))
    assert all(type(p) is str for p in expand_sources(tmp_path))  # plain strings for callers


def test_empty_directory_and_unmatched_glob(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageNotFoundError, match="empty holds no image files"):
        list(iter_sources(tmp_path / "empty"))
    with pytest.raises(ImageNotFoundError, match="matched no image"):
        list(iter_sources(str(tmp_path / "*.jpg")))
    with pytest.raises(ImageError, match=r"is a directory, not one image.*model\(source\)") as info:
        load_image(tmp_path)
    assert "iter_sources" not in str(info.value)  # an internal name means nothing to a user
    with pytest.raises(ImageError, match="empty list"):
        list(iter_sources([]))


def test_bad_arrays_tensors_and_types() -> None:
    with pytest.raises(ImageError, match="H×W×3 BGR"):
        load_image(np.zeros((5, 5, 2), np.uint8))
    with pytest.raises(ImageError, match="channels-first"):
        load_image(np.zeros((3, 20, 30), np.uint8))
    with pytest.raises(ImageError, match="0..1"):
        load_image(np.full((5, 5, 3), 200.0, np.float32))
    with pytest.raises(ImageError, match="empty image"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match=r"\(3,H,W\)"):
        load_image(torch.zeros(20, 30, 3))
    with pytest.raises(ImageError, match="unsupported image source of type int"):
        load_image(5)
    with pytest.raises(ImageError, match="unsupported image source"):
        list(iter_sources([_bgr(), 5]))
    with pytest.raises(ConfigError, match="vid_stride"):
        list(iter_sources(_bgr(), vid_stride=0))


def test_extension_constants() -> None:
    assert {".jpg", ".jpeg", ".png", ".tif", ".bmp", ".webp"} <= IMAGE_EXTENSIONS
    assert {".mp4", ".avi", ".mov", ".mkv", ".webm"} <= VIDEO_EXTENSIONS
    assert not IMAGE_EXTENSIONS & VIDEO_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)


def test_a_folder_is_listed_once_per_call(tmp_path: Path, monkeypatch) -> None:
    """A call that counts its images (a list result, verbose, the CLI's progress) and then runs them
    lists each folder once: the count and the run see the same files. An unreadable listed file
    is still skipped, and an ExpandedSources passes through unchanged."""
    from test_train import TINY

    from segany.engine.predictor import Predictor
    from segany.engine.sources import ExpandedSources, expand_once
    from segany.models import build_model

    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(folder / name), np.full((40, 50, 3), 90, np.uint8))
    (folder / "c.jpg").write_bytes(b"not a jpeg")
    listed: list[Path] = []
    iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: listed.append(self) or iterdir(self))
    pred = Predictor(overrides=dict(device="cpu"), model=build_model(TINY))
    with pytest.warns(SkippedImageWarning):
        results = pred(source=str(folder), bboxes=[5, 5, 30, 30], verbose=True)
    assert [Path(r.path).name for r in results] == ["a.png", "b.png"]
    assert listed == [folder]
    once = expand_once(str(folder))
    assert isinstance(once, ExpandedSources) and expand_once(once) is once
    assert count_sources(once) == 3 and len(listed) == 2


def test_expand_once_leaves_generators_to_be_iterated_lazily() -> None:
    """A generator or another iterable, alone or in a list, is not drained by expand_once
    (expanding would hold all its images at once); lists of paths and arrays are expanded."""
    from segany.engine.sources import ExpandedSources, expand_once

    frames = (np.zeros((8, 8, 3), np.uint8) for _ in range(3))
    assert expand_once(frames) is frames and next(frames).shape == (8, 8, 3)
    nested = [np.zeros((8, 8, 3), np.uint8), frames]
    assert expand_once(nested) is nested and len(list(frames)) == 2

    class Reader:  # an iterable that is not an iterator, e.g. a video or dataset reader
        def __iter__(self):
            return (np.zeros((8, 8, 3), np.uint8) for _ in range(2))

    reader = Reader()
    assert expand_once(reader) is reader and expand_once([reader]) == [reader]
    arrays = [np.zeros((8, 8, 3), np.uint8)] * 2
    assert isinstance(expand_once(arrays), ExpandedSources) and len(expand_once(arrays)) == 2


# ---------------------------------------------------------------- review: limits, noise, URLs


def test_a_decompression_bomb_is_refused_not_handed_to_opencv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses an image far above its pixel limit; the OpenCV fallback (which has none of
    its own below 2**30 pixels) must not decode it anyway. The message says how to allow it."""
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((50, 50, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2500 pixels > 2 × 1000: a "bomb"
    with pytest.raises(ImageError, match=r"big\.png: 2,500 pixels, over .* limit of 2,000; .*MAX_IMAGE_PIXELS = None") as info:
        load_image(tmp_path / "big.png")
    assert not isinstance(info.value, ImageNotFoundError)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the documented way to allow it
    assert load_image(tmp_path / "big.png").shape == (50, 50, 3)


def test_a_corrupt_file_gives_one_error_and_no_opencv_log_lines(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Pillow fails on a truncated TIFF, and so does OpenCV's fallback: the user gets the ImageError,
    not also OpenCV's C++ log lines on stderr (four per file: noise over a folder of photos)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), np.uint8)).save(tmp_path / "a.tif")
    data = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(ImageError, match=r"cut\.tif is not a readable image"):
        load_image(tmp_path / "cut.tif")
    err = capfd.readouterr().err
    assert "TIFF" not in err and "imdecode" not in err, err
    assert cv2.utils.logging.getLogLevel() != cv2.utils.logging.LOG_LEVEL_SILENT  # restored


def test_an_empty_string_is_not_the_current_directory() -> None:
    """``source=""`` (an unset variable, an empty CLI value) is an error that says so, not a run
    over the working directory or "directory  holds no image files"."""
    for call in (load_image, lambda s: list(iter_sources(s)), count_sources, lambda s: list(iter_sources([s]))):
        with pytest.raises(ImageError, match="empty string"):
            call("")
        with pytest.raises(ImageError, match="empty string"):
            call("   ")


def test_pil_premultiplied_modes() -> None:
    """Pillow's premultiplied-alpha modes (La, RGBa) are read like LA and RGBA."""
    la = Image.fromarray(np.dstack([_bgr()[..., 1], np.full((H, W), 255, np.uint8)]), "LA")
    np.testing.assert_array_equal(load_image(la.convert("La")), np.dstack([_bgr()[..., 1]] * 3))
    rgba = Image.fromarray(np.dstack([_bgr()[..., ::-1], np.full((H, W), 255, np.uint8)]), "RGBA")
    np.testing.assert_array_equal(load_image(rgba.convert("RGBa")), _bgr())


def test_a_video_url_is_downloaded_and_read_frame_by_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As Ultralytics does, a URL whose path names a video is downloaded and read frame by frame
    (a query string does not hide the extension); frames are named after the URL; the download
    is removed afterwards; a URL that is not a video gives an ImageError naming it."""
    import tempfile

    served, scratch = tmp_path / "served", tmp_path / "scratch"
    served.mkdir()
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    _write_video(served / "v.avi", 4)
    (served / "bad.mp4").write_bytes(b"not a video" * 10)
    with _http_server(functools.partial(_QuietHandler, directory=str(served)), monkeypatch) as base:
        for url in (f"{base}/v.avi", f"{base}/v.avi?token=1"):
            frames = list(iter_sources(url, vid_stride=2))
            assert [n for n, _ in frames] == [f"{url}:frame_0", f"{url}:frame_2"]
            assert all(f.shape == (48, 64, 3) for _, f in frames)
            assert count_sources(url) is None  # unknown until downloaded
        assert [n for n, _ in iter_sources([f"{base}/v.avi"])][-1] == f"{base}/v.avi:frame_3"
        with pytest.raises(ImageError, match=r"bad\.mp4 is not a readable video"):
            list(iter_sources(f"{base}/bad.mp4"))
        with pytest.raises(ImageError, match=r"could not download video .*missing\.mp4: HTTP Error 404"):
            list(iter_sources(f"{base}/missing.mp4"))
        # saved as an annotated video at the source's rate over vid_stride, as a video file is
        from segany import SAM

        SAM()(f"{base}/v.avi", bboxes=[5, 5, 40, 30], save=True, vid_stride=2, project=str(tmp_path / "runs"),
              name="url")
        saved = cv2.VideoCapture(str(tmp_path / "runs" / "url" / "v.mp4"))
        assert saved.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0) and saved.get(cv2.CAP_PROP_FRAME_COUNT) == 2
        assert list(scratch.iterdir()) == []  # every download removed
