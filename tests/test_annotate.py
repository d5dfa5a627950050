"""auto_annotate: box sources, YOLO-seg / COCO output, class preservation, resume, atomic writes.

No trained SAM exists in the tests: mechanics run on the small random checkpoint, and exact
contents on an "oracle" decoder that returns the drawn shape inside each box (so the written
polygons must rasterise back to the known masks).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

import segany
from segany import auto_annotate
from segany.errors import MissingDependencyError
from segany.engine.predictor import Predictor
from segany.errors import ConfigError

# pycocotools' annToMask trips a numpy 2 deprecation inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BG = (20, 20, 20)
COLOURS = {0: (0, 200, 255), 1: (255, 80, 0), 2: (80, 255, 80)}  # one colour per class (BGR)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def draw(h: int, w: int, shapes: list[tuple[int, str, tuple[int, int, int, int]]]):
    """Image with the shapes ``(cls, "rect" | "disc", (x1, y1, x2, y2))`` → (image, [(cls, mask)])."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BG
    yy, xx = np.mgrid[:h, :w]
    objects = []
    for c, kind, (x1, y1, x2, y2) in shapes:
        if kind == "rect":
            m = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
        else:
            cx, cy, rx, ry = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img[m] = COLOURS[c]
        objects.append((c, m))
    return img, objects


def tight_box(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def yolo_box_line(c: int, m: np.ndarray) -> str:
    h, w = m.shape
    x1, y1, x2, y2 = tight_box(m)
    return f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"


# Hand-made images: "exact" has two rectangles (known polygon text), "shapes" has three shapes
# (classes 1, 0, 2 in label order), "nobox" has no label file, "blank" an empty label file.
HAND = {
    "exact": (80, 100, [(2, "rect", (10, 20, 30, 50)), (0, "rect", (60, 8, 90, 24))]),
    "shapes": (72, 96, [(1, "disc", (4, 10, 30, 40)), (0, "rect", (36, 30, 60, 64)), (2, "disc", (66, 6, 92, 28))]),
    "nobox": (64, 64, []),
    "blank": (64, 80, []),
}
EXACT_TXT = (
    "2 0.100000 0.250000 0.100000 0.612500 0.290000 0.612500 0.290000 0.250000\n"
    "0 0.600000 0.100000 0.600000 0.287500 0.890000 0.287500 0.890000 0.100000\n"
)


def make_dataset(root: Path, specs: dict) -> dict[str, list[tuple[int, np.ndarray]]]:
    """``root/images/<stem>.png`` + ``root/labels/<stem>.txt`` (YOLO boxes) + ``root/coco.json``."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    truth, coco = {}, {"images": [], "annotations": [], "categories": [
        {"id": 1, "name": "box"}, {"id": 3, "name": "disc"}, {"id": 7, "name": "blob"}]}
    for k, (stem, (h, w, shapes)) in enumerate(specs.items(), 1):
        img, objects = draw(h, w, shapes)
        cv2.imwrite(str(root / "images" / f"{stem}.png"), img)
        truth[stem] = objects
        if stem != "nobox":
            (root / "labels" / f"{stem}.txt").write_text("".join(yolo_box_line(c, m) + "\n" for c, m in objects))
        coco["images"].append({"id": 100 + k, "file_name": f"{stem}.png", "width": w, "height": h})
        for c, m in objects:
            x1, y1, x2, y2 = tight_box(m)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": 100 + k,
                                        "category_id": [1, 3, 7][c], "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
    (root / "coco.json").write_text(json.dumps(coco))
    return truth


def grid_specs(n: int) -> dict:
    """``n`` images, each with 1-3 shapes in separate thirds (deterministic)."""
    specs = {}
    for i in range(n):
        h, w = 60 + 4 * (i % 3), 90 + 6 * (i % 2)
        shapes = [(c := (i + j) % 3, "rect" if c != 1 else "disc", (30 * j + 3, 8 + j, 30 * j + 25, 40 + j))
                  for j in range(1 + i % 3)]
        specs[f"img{i:02d}"] = (h, w, shapes)
    return specs


def parse(txt: Path) -> list[tuple[int, np.ndarray]]:
    out = []
    for line in txt.read_text().splitlines():
        f = line.split()
        assert len(f) >= 7 and len(f) % 2 == 1, line
        out.append((int(f[0]), np.array(f[1:], np.float64).reshape(-1, 2)))
    return out


def rasterise(poly_n: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    cv2.fillPoly(out, [np.round(poly_n * [w, h]).astype(np.int32).reshape(-1, 1, 2)], 1)
    return out.astype(bool)


@pytest.fixture
def oracle(monkeypatch):
    """Replace SAM's decoder output by the drawn shape inside each box; record the prompt calls."""
    calls: list[int] = []

    def decode(self, state, prompts, multimask, half=False, **kw):
        calls.append(len(prompts))
        self._boxes = prompts.boxes
        return torch.zeros(len(prompts), 1, 256, 256), torch.ones(len(prompts), 1)

    def logits_to_masks(self, state, low_res):
        img, masks = state.orig_img, []
        for x1, y1, x2, y2 in np.round(self._boxes).astype(int):
            m = np.zeros(img.shape[:2], bool)
            colour = img[(y1 + y2) // 2, (x1 + x2) // 2]
            m[y1:y2, x1:x2] = (img[y1:y2, x1:x2] == colour).all(-1)
            masks.append(m)
        return torch.from_numpy(np.stack(masks))[:, None]

    monkeypatch.setattr(Predictor, "decode", decode)
    monkeypatch.setattr(Predictor, "logits_to_masks", logits_to_masks)
    return calls


def test_yolo_labels_to_exact_polygons(tmp_path, small_ckpt, oracle):
    truth = make_dataset(tmp_path, HAND)
    # Default det_model with labels=: the labels are the box source, no detector is needed.
    s = auto_annotate(data=str(tmp_path / "images"), labels=str(tmp_path / "labels"), sam_model=small_ckpt,
                      verbose=False)
    out = tmp_path / "images_auto_annotate_labels"  # default: beside data
    assert s.output_dir == str(out) and not s.failed and not s.empty_masks
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{k}.txt" for k in HAND] + ["classes.txt", "data.yaml"])
    assert (out / "exact.txt").read_text() == EXACT_TXT
    assert (out / "nobox.txt").read_text() == "" and (out / "blank.txt").read_text() == ""
    assert sorted(Path(p).stem for p in s.no_detections) == ["blank", "nobox"]
    assert len(s.written) == 4 and s.elapsed > 0
    assert oracle == [2, 3]  # one prompt call per image with boxes, all its boxes together
    for stem, objects in truth.items():
        lines = parse(out / f"{stem}.txt")
        assert [c for c, _ in lines] == [c for c, _ in objects]  # classes in box order
        for (_, poly), (_, m) in zip(lines, objects):
            assert len(poly) >= 3 and poly.min() >= 0 and poly.max() <= 1
            assert np.array_equal(rasterise(poly, *m.shape), m)  # polygon → the known mask
    assert (out / "classes.txt").read_text() == "0\n1\n2\n"
    assert (out / "data.yaml").read_text().endswith('nc: 3\nnames:\n  0: "0"\n  1: "1"\n  2: "2"\n')


def test_coco_boxes_in_coco_and_yolo_out(tmp_path, small_ckpt, oracle):
    truth = make_dataset(tmp_path, HAND)
    images, out = tmp_path / "images", tmp_path / "out"
    s = auto_annotate(data=images, det_model=None, labels=tmp_path / "coco.json", sam_model=small_ckpt,
                      output_dir=out, format="coco", verbose=False)
    assert not s.failed and len(s.written) == 4 and sorted(os.listdir(out)) == ["annotations.json"]
    coco = COCO(str(out / "annotations.json"))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {1: "box", 3: "disc", 7: "blob"}
    assert len(coco.getImgIds()) == 4  # images without boxes are listed too (background)
    given = {e["file_name"]: e["id"] for e in json.loads((tmp_path / "coco.json").read_text())["images"]}
    written = {e["file_name"]: e["id"] for e in coco.loadImgs(coco.getImgIds())}
    assert written == {k: given.get(k, max(given.values()) + 1) for k in written}  # the JSON's own ids kept
    for img in coco.loadImgs(coco.getImgIds()):
        objects = truth[Path(img["file_name"]).stem]
        assert (img["height"], img["width"]) == objects[0][1].shape if objects else True
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert [a["category_id"] for a in anns] == [[1, 3, 7][c] for c, _ in objects]
        for a, (_, m) in zip(anns, objects):
            assert np.array_equal(coco.annToMask(a).astype(bool), m)
            assert a["bbox"] == list(map(float, (x1 := tight_box(m))[:2] + (x1[2] - x1[0], x1[3] - x1[1])))
    # The same COCO boxes to YOLO-seg: contiguous class ids in category-id order, names from the JSON.
    s = auto_annotate(data=images, det_model=None, labels=tmp_path / "coco.json", sam_model=small_ckpt,
                      output_dir=tmp_path / "yolo", verbose=False)
    assert (tmp_path / "yolo" / "exact.txt").read_text() == EXACT_TXT
    assert (tmp_path / "yolo" / "classes.txt").read_text() == "box\ndisc\nblob\n"


def test_classes_of_a_coco_source_are_its_category_ids(tmp_path, small_ckpt, oracle):
    # The file says 1 box, 3 disc, 7 blob (and a COCO output writes those ids): classes= names them,
    # not the 0..K-1 order they get in YOLO labels.
    make_dataset(tmp_path, HAND)
    kw = dict(data=tmp_path / "images", det_model=None, labels=tmp_path / "coco.json", sam_model=small_ckpt,
              verbose=False)
    for classes, want in (([3], {3}), ([1, 7], {1, 7})):
        out = tmp_path / f"coco_{classes}"
        auto_annotate(output_dir=out, format="coco", classes=classes, **kw)
        doc = json.loads((out / "annotations.json").read_text())
        assert doc["annotations"] and {a["category_id"] for a in doc["annotations"]} == want
    with pytest.raises(ConfigError, match=r"classes=\[2\]: with boxes from a COCO JSON, classes are its "
                                          r"category ids; \[2\] not among them \(\[1, 3, 7\]\)"):
        auto_annotate(output_dir=tmp_path / "none", classes=[2], **kw)


def test_random_sam_mechanics_and_coco(tmp_path, small_ckpt):
    truth = make_dataset(tmp_path, HAND)
    s = auto_annotate(data=tmp_path / "images", det_model=None, labels=tmp_path / "labels", sam_model=small_ckpt,
                      output_dir=tmp_path / "out", class_names=["box", "disc", "blob"], verbose=False)
    empty = {(Path(e.image).stem, e.index) for e in s.empty_masks}
    for stem, objects in truth.items():
        lines = parse(tmp_path / "out" / f"{stem}.txt")
        assert [c for c, _ in lines] == [c for i, (c, _) in enumerate(objects) if (stem, i) not in empty]
        assert all(len(p) >= 3 and 0 <= p.min() and p.max() <= 1 for _, p in lines)
    assert 'names:\n  0: "box"\n  1: "disc"\n  2: "blob"\n' in (tmp_path / "out" / "data.yaml").read_text()
    auto_annotate(data=tmp_path / "images", det_model=None, labels=tmp_path / "labels", sam_model=small_ckpt,
                  output_dir=tmp_path / "coco", format="coco", verbose=False)
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["0", "1", "2"]
    for a in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(a["image_id"])[0]
        assert coco.annToMask(a).shape == (img["height"], img["width"]) and a["area"] > 0


def test_empty_mask_is_reported_without_shifting_classes(tmp_path, small_ckpt, monkeypatch):
    truth = make_dataset(tmp_path, {"shapes": HAND["shapes"]})
    original = Predictor.logits_to_masks

    def drop_second(self, state, low_res):  # the real masks, except box 1's comes out empty
        masks = original(self, state, low_res)
        masks[1] = False
        return masks

    monkeypatch.setattr(Predictor, "logits_to_masks", drop_second)
    s = auto_annotate(data=tmp_path / "images", det_model=None, labels=tmp_path / "labels", sam_model=small_ckpt,
                      output_dir=tmp_path / "out", verbose=False)
    assert [(Path(e.image).stem, e.index, e.cls, e.reason) for e in s.empty_masks] == [("shapes", 1, 0, "empty mask")]
    assert [c for c, _ in parse(tmp_path / "out" / "shapes.txt")] == [1, 2]  # not [1, 0]
    assert [c for c, _ in truth["shapes"]] == [1, 0, 2]


def test_rerun_skips_overwrite_redoes(tmp_path, small_ckpt, oracle):
    make_dataset(tmp_path, HAND)
    kw = dict(data=tmp_path / "images", det_model=None, labels=tmp_path / "labels", sam_model=small_ckpt,
              output_dir=tmp_path / "out", verbose=False)
    auto_annotate(**kw)
    files = sorted((tmp_path / "out").iterdir())
    for f in files:
        os.utime(f, (1_000_000, 1_000_000))  # an old mtime: any rewrite would show
    s = auto_annotate(**kw)
    assert len(s.skipped_existing) == 4 and not s.written and all(f.stat().st_mtime == 1_000_000 for f in files)
    s = auto_annotate(**kw, overwrite=True)
    assert len(s.written) == 4 and all(f.stat().st_mtime != 1_000_000 for f in files if f.suffix == ".txt"
                                       and f.name != "classes.txt")
    # COCO: a finished file means done; overwrite=True redoes it.
    kw.update(output_dir=tmp_path / "coco", format="coco")
    auto_annotate(**kw)
    os.utime(tmp_path / "coco" / "annotations.json", (1_000_000, 1_000_000))
    assert len(auto_annotate(**kw).skipped_existing) == 4
    assert (tmp_path / "coco" / "annotations.json").stat().st_mtime == 1_000_000
    assert len(auto_annotate(**kw, overwrite=True).written) == 4


def test_corrupt_image_and_same_stem_are_reported(tmp_path, small_ckpt, capsys):
    make_dataset(tmp_path, {k: HAND[k] for k in ("exact", "shapes")})
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "images" / "zero.png").write_bytes(b"")
    cv2.imwrite(str(tmp_path / "images" / "shapes.jpg"), np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "labels" / "broken.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "exact.txt").write_text("0 0.5 0.5 0.2\n")  # malformed: reported, not fatal
    s = auto_annotate(data=tmp_path / "images", det_model=None, labels=tmp_path / "labels", sam_model=small_ckpt,
                      output_dir=tmp_path / "out", verbose=True)
    assert sorted(Path(p).name for p in s.failed) == ["broken.jpg", "exact.png", "shapes.png", "zero.png"]
    assert "expected 'cls xc yc w h'" in s.failed[str(tmp_path / "images" / "exact.png")]
    assert [Path(p).name for p in s.written] == ["shapes.jpg"]  # first in sorted order owns shapes.txt
    assert sorted(os.listdir(tmp_path / "out")) == ["classes.txt", "data.yaml", "shapes.txt"]
    printed = capsys.readouterr().out
    assert "4 failed" in printed and "broken.jpg" in printed and "zero.png" in printed


KILL_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)  # as the test process: same results, and faster on a busy machine
from segany.engine.predictor import Predictor
encode = Predictor.set_image
def slow(self, image):  # slow enough to be killed mid-run
    time.sleep(0.15)
    return encode(self, image)
Predictor.set_image = slow
from segany import auto_annotate
images, labels, ckpt, out = sys.argv[1:]
auto_annotate(data=images, det_model=None, labels=labels, sam_model=ckpt, output_dir=out, verbose=False)
"""


def test_killed_run_leaves_complete_files_and_resumes(tmp_path, small_ckpt):
    make_dataset(tmp_path, grid_specs(20))
    images, labels, out = tmp_path / "images", tmp_path / "labels", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(images), str(labels), small_ckpt, str(out)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and sum(p.suffix == ".txt" for p in out.iterdir()) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = {p.name: p.read_text() for p in out.iterdir() if not p.name.startswith(".")}
    assert 3 <= len(done) < 20 and all(n.startswith("img") for n in done)  # killed mid-run, before classes.txt
    before = {name: (out / name).stat().st_mtime_ns for name in done}
    s = auto_annotate(data=images, det_model=None, labels=labels, sam_model=small_ckpt, output_dir=out,
                      verbose=False)
    assert len(s.skipped_existing) == len(done) and len(s.written) == 20 - len(done)
    assert sorted(os.listdir(out)) == sorted([f"img{i:02d}.txt" for i in range(20)] + ["classes.txt", "data.yaml"])
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # resumed, not redone
    # Every file the killed run left is complete: the same as a fresh run of those images.
    ref = tmp_path / "ref"
    with pytest.warns(UserWarning, match=rf"boxes for {20 - len(done)} image\(s\) that data does not hold"):
        auto_annotate(data=[str(images / f"{Path(n).stem}.png") for n in done], det_model=None, labels=labels,
                      sam_model=small_ckpt, output_dir=ref, write_names=False, verbose=False)
    assert {p.name: p.read_text() for p in ref.iterdir()} == done


def test_stale_temp_files_are_removed(tmp_path, small_ckpt):
    make_dataset(tmp_path, {"exact": HAND["exact"]})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale, mine = out / f".exact.txt.{dead.pid}.0123abcd.tmp", out / f".exact.txt.{os.getpid()}.0123abcd.tmp"
    stale.write_text("0 0.1")
    mine.write_text("0 0.1")  # a live process's temp file stays
    auto_annotate(data=tmp_path / "images", det_model=None, labels=tmp_path / "labels", sam_model=small_ckpt,
                  output_dir=out, verbose=False)
    assert not stale.exists() and mine.exists()


def test_fake_ultralytics_detector(tmp_path, small_ckpt, oracle, monkeypatch):
    """The detector path with a stand-in ``ultralytics`` module: arguments, names, classes."""
    truth = make_dataset(tmp_path, {k: HAND[k] for k in ("exact", "shapes")})
    seen = {}

    class YOLO:
        names = {0: "box", 1: "disc", 2: "blob"}

        def __init__(self, model):
            seen["model"] = model

        def predict(self, image, **kw):
            seen["kw"] = kw
            objects = truth["exact" if image.shape[:2] == (80, 100) else "shapes"]
            return [types.SimpleNamespace(boxes=FakeBoxes(objects))]

    class FakeBoxes:  # like ultralytics' Boxes: tensors xyxy and cls, and a length
        def __init__(self, objects):
            self.xyxy = torch.tensor([tight_box(m) for _, m in objects], dtype=torch.float32)
            self.cls = torch.tensor([float(c) for c, _ in objects])

        def __len__(self):
            return len(self.cls)

    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=YOLO))
    s = auto_annotate(data=tmp_path / "images", det_model="yolov8n.pt", sam_model=small_ckpt, device="cpu",
                      conf=0.1, iou=0.5, imgsz=320, max_det=7, classes=[0, 2], output_dir=tmp_path / "out",
                      verbose=False)
    assert seen["model"] == "yolov8n.pt"
    assert seen["kw"] == dict(conf=0.1, iou=0.5, imgsz=320, max_det=7, classes=[0, 2], device="cpu", verbose=False)
    assert not s.failed and (tmp_path / "out" / "exact.txt").read_text() == EXACT_TXT
    assert [c for c, _ in parse(tmp_path / "out" / "shapes.txt")] == [0, 2]  # classes= filters
    assert (tmp_path / "out" / "classes.txt").read_text() == "box\ndisc\nblob\n"


def test_missing_ultralytics_is_a_clear_error(tmp_path, monkeypatch):
    make_dataset(tmp_path, {"exact": HAND["exact"]})
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import ultralytics → ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install segany\[annotate\].*pip install ultralytics"):
        auto_annotate(data=tmp_path / "images", det_model="yolo11n.pt", output_dir=tmp_path / "out", verbose=False)
    with pytest.raises(ImportError):
        auto_annotate(data=tmp_path / "images", output_dir=tmp_path / "out", verbose=False)


def test_real_ultralytics_random_yolo(tmp_path, small_ckpt):
    ultralytics = pytest.importorskip("ultralytics")
    make_dataset(tmp_path, {k: HAND[k] for k in ("exact", "shapes")})
    det = ultralytics.YOLO("yolov8n.yaml")  # randomly initialised, nothing downloaded
    s = auto_annotate(data=tmp_path / "images", det_model=det, sam_model=small_ckpt, conf=0.0, max_det=5,
                      imgsz=128, device="cpu", output_dir=tmp_path / "out", verbose=False)
    assert not s.failed and len(s.written) == 2
    for f in ("exact.txt", "shapes.txt"):
        assert all(0 <= c < len(det.names) for c, _ in parse(tmp_path / "out" / f))


def test_argument_errors(tmp_path, small_ckpt):
    make_dataset(tmp_path, {"exact": HAND["exact"]})
    images, labels = tmp_path / "images", tmp_path / "labels"
    with pytest.raises(ConfigError, match="format"):
        auto_annotate(data=images, labels=labels, format="voc", verbose=False)
    with pytest.raises(ConfigError, match="not both"):
        auto_annotate(data=images, det_model="yolov8n.pt", labels=labels, verbose=False)
    with pytest.raises(ConfigError, match="no boxes"):
        auto_annotate(data=images, det_model=None, verbose=False)
    with pytest.raises(ConfigError, match="labels folder"):
        auto_annotate(data=images, labels=labels, output_dir=labels, verbose=False)
    with pytest.raises(ConfigError, match="no <image name>.txt"):
        auto_annotate(data=images, labels=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="output_dir"):
        auto_annotate(data=[str(images / "exact.png")], labels=labels, verbose=False)
    with pytest.raises(ConfigError, match="classes"):
        auto_annotate(data=images, labels=labels, classes="person", verbose=False)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        auto_annotate(data=images, labels=labels, sam_model=str(tmp_path / "missing.pt"), output_dir=tmp_path / "never",
                      verbose=False)
    assert not (tmp_path / "never").exists()  # nothing written, no folder
    with pytest.raises(ConfigError, match="is a file: give a folder"):
        auto_annotate(data=images, labels=labels, output_dir=images / "exact.png", verbose=False)
    with pytest.raises(ConfigError, match="whole numbers >= 0"):
        auto_annotate(data=images, labels=labels, classes=-1, verbose=False)
    with pytest.warns(UserWarning, match=r"classes=\[97\] kept none of the \d+ boxes"):
        s = auto_annotate(data=images, labels=labels, sam_model=small_ckpt, classes=[97], output_dir=tmp_path / "o",
                          verbose=False)
    assert s.written and (tmp_path / "o" / "exact.txt").read_text() == ""
    assert "auto_annotate" in segany.__all__


@pytest.mark.parametrize("option,message", [
    (dict(conf="x"), "conf='x': expected a number"),
    (dict(conf=1.5), r"conf=1.5: expected a minimum box confidence in \[0, 1\]"),
    (dict(iou=-0.1), r"iou=-0.1: expected an NMS IoU threshold in \[0, 1\]"),
    (dict(imgsz=0), "imgsz=0: expected an integer >= 1"),
    (dict(imgsz=[640, 480, 3]), r"imgsz=\[640, 480, 3\]: give one size or \[height, width\], e.g. imgsz=640"),
    (dict(max_det=0), "max_det=0: expected an integer >= 1"),
    (dict(max_det=2.5), "max_det=2.5: expected an integer"),
    (dict(classes="person"), r"classes must be a class id .*, got 'person'"),
])
def test_detector_options_are_checked_whatever_the_box_source(tmp_path, option, message):
    """conf/iou/imgsz/max_det only steer a detector, but a bad value is the same one-line error
    before any work when the boxes come from labels: never silently unused."""
    make_dataset(tmp_path, {"exact": HAND["exact"]})
    out = tmp_path / "out"
    detector = types.SimpleNamespace(names={0: "box"}, predict=lambda *a, **k: pytest.fail("the detector ran"))
    sources = (dict(det_model=detector), dict(labels=tmp_path / "labels"),
               dict(det_model=None, labels=tmp_path / "coco.json"))
    errors = set()
    for source in sources:
        with pytest.raises(ConfigError) as e:
            auto_annotate(data=tmp_path / "images", sam_model=str(tmp_path / "missing.pt"), output_dir=out,
                          verbose=False, **source, **option)
        errors.add(str(e.value))
    assert len(errors) == 1 and re.fullmatch(message, errors.pop())
    assert not out.exists()  # refused before any image was done


def test_cli_refuses_bad_detector_options_with_labels(tmp_path, capsys):
    from segany.cli import main

    make_dataset(tmp_path, {"exact": HAND["exact"]})
    args = ["annotate", f"data={tmp_path / 'images'}", f"labels={tmp_path / 'labels'}",
            f"output_dir={tmp_path / 'out'}", f"sam_model={tmp_path / 'missing.pt'}"]
    for bad, message in (("max_det=0", "max_det=0: expected an integer >= 1"),
                         ("conf=x", "conf='x': expected a number")):
        assert main([*args, bad]) != 0
        assert capsys.readouterr().err.strip().splitlines() == [f"segany: error: {message}"]
    assert not (tmp_path / "out").exists()


def test_cli_takes_a_detector_size_of_height_and_width(tmp_path, small_ckpt):
    # imgsz=[h, w] is the detector's (Ultralytics takes it); only SAM's own imgsz must be square
    from segany.cli import main

    make_dataset(tmp_path, {"exact": HAND["exact"]})
    assert main(["annotate", f"data={tmp_path / 'images'}", f"labels={tmp_path / 'labels'}",
                 f"output_dir={tmp_path / 'out'}", f"sam_model={small_ckpt}", "imgsz=[640,480]"]) == 0
    assert (tmp_path / "out" / "exact.txt").is_file()


def test_boxes_of_images_not_in_data_are_reported(tmp_path, small_ckpt, oracle):
    """Label files and COCO images that no image of data matches: their boxes would go unused in
    silence. A warning names the first few, the summary counts them."""
    make_dataset(tmp_path, HAND)
    images, labels, coco = tmp_path / "images", tmp_path / "labels", tmp_path / "coco.json"
    (labels / "classes.txt").write_text("box\ndisc\nblob\n")  # names, not boxes: never reported
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every box file has its image: no warning
        s = auto_annotate(data=images, labels=labels, sam_model=small_ckpt, output_dir=tmp_path / "all",
                          verbose=False)
    assert s.not_in_data == [] and "not in data" not in str(s)
    (images / "shapes.png").unlink()
    (images / "blank.png").unlink()
    with pytest.warns(UserWarning, match=r"labels='.*labels' has boxes for 2 image\(s\) that data does not hold "
                                         r"\(blank\.txt, shapes\.txt\): their boxes are not used; check data="):
        s = auto_annotate(data=images, labels=labels, sam_model=small_ckpt, output_dir=tmp_path / "yolo",
                          verbose=False)
    assert s.not_in_data == ["blank.txt", "shapes.txt"] and len(s.written) == 2
    assert "0 failed, 0 empty mask(s) skipped, 2 labelled image(s) not in data (boxes unused); " in str(s)
    doc = json.loads(coco.read_text())
    doc["images"] += [{"id": 200 + i, "file_name": f"extra{i}.png", "width": 9, "height": 9} for i in range(6)]
    coco.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"has boxes for 8 image\(s\) that data does not hold \(shapes\.png, "
                                         r"blank\.png, extra0\.png, extra1\.png, extra2\.png, \.\.\.\)"):
        s = auto_annotate(data=images, det_model=None, labels=coco, sam_model=small_ckpt, format="coco",
                          output_dir=tmp_path / "coco", verbose=False)
    assert s.not_in_data == ["shapes.png", "blank.png"] + [f"extra{i}.png" for i in range(6)]
    assert ", 8 labelled image(s) not in data" in str(s) and len(s.written) == 2


def test_class_names_must_cover_the_box_classes(tmp_path, small_ckpt):
    """Names that stop short of a class the labels use would give a data.yaml whose nc is below
    that class (a YOLO trainer refuses it): refused before any image is done."""
    make_dataset(tmp_path, {k: HAND[k] for k in ("exact", "shapes")})
    images, labels, out = tmp_path / "images", tmp_path / "labels", tmp_path / "out"
    with open(labels / "exact.txt", "a") as f:
        f.write("7 0.5 0.5 0.2 0.2\n")
    (tmp_path / "names.txt").write_text("box\ndisc\n")
    with pytest.raises(ConfigError, match=r"names\.txt' has 2 name\(s\) \(class ids 0\.\.1\) but the boxes also use "
                                          r"class id\(s\) 2 \(e\.g\. in .*\), 7 \(e\.g\. in .*exact\.txt\)"):
        auto_annotate(data=images, labels=labels, sam_model=small_ckpt, output_dir=out,
                      class_names=tmp_path / "names.txt", verbose=False)
    assert not out.exists()  # nothing done
    (labels / "classes.txt").write_text("box\ndisc\nblob\n")  # LabelImg's names: the same rule
    with pytest.raises(ConfigError, match=r"classes\.txt has 3 name\(s\).* class id\(s\) 7 "):
        auto_annotate(data=images, labels=labels, sam_model=small_ckpt, output_dir=out, verbose=False)
    assert not out.exists()
    # Only the classes kept must be named; COCO boxes are checked too.
    s = auto_annotate(data=images, labels=labels, sam_model=small_ckpt, output_dir=out, classes=[0, 1, 2],
                      verbose=False)
    assert not s.failed and "nc: 3\n" in (out / "data.yaml").read_text()
    with pytest.raises(ConfigError, match=r"class id\(s\) 2 "):
        auto_annotate(data=images, det_model=None, labels=tmp_path / "coco.json", sam_model=small_ckpt,
                      output_dir=tmp_path / "o2", class_names=["box", "disc"], verbose=False)


def test_coco_boxes_ambiguous_base_name_is_an_error(tmp_path, small_ckpt, oracle):
    """Two JSON entries with the image's base name: the path tells them apart, else the image
    fails (listed, retried by a rerun), never an empty label file counted as background."""
    for folder, spec in (("train", HAND["exact"]), ("val", HAND["shapes"]), ("other", HAND["exact"])):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), draw(spec[0], spec[1], spec[2])[0])
    cv2.imwrite(str(tmp_path / "other" / "b.png"), draw(*HAND["nobox"])[0])  # matched: a background image
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}, {"id": 3, "name": "disc"},
                                                            {"id": 7, "name": "blob"}]}
    for k, (folder, (h, w, shapes)) in enumerate((("train", HAND["exact"]), ("val", HAND["shapes"])), 1):
        coco["images"].append({"id": k, "file_name": f"{folder}/a.png", "width": w, "height": h})
        for c, m in draw(h, w, shapes)[1]:
            x1, y1, x2, y2 = tight_box(m)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": k,
                                        "category_id": [1, 3, 7][c], "bbox": [x1, y1, x2 - x1, y2 - y1]})
    coco["images"].append({"id": 20, "file_name": "b.png", "width": 64, "height": 64})
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    kw = {"det_model": None, "labels": tmp_path / "coco.json", "sam_model": small_ckpt, "verbose": False}
    s = auto_annotate(data=tmp_path / "other", output_dir=tmp_path / "out", **kw)
    image = str(tmp_path / "other" / "a.png")
    assert list(s.failed) == [image] and [Path(p).name for p in s.no_detections] == ["b.png"]
    assert "train/a.png" in s.failed[image] and "val/a.png" in s.failed[image]
    assert not (tmp_path / "out" / "a.txt").exists()
    assert list(auto_annotate(data=tmp_path / "other", output_dir=tmp_path / "out", **kw).failed) == [image]
    with pytest.warns(UserWarning, match=r"2 image\(s\) that data does not hold \(val/a\.png, b\.png\)"):
        s = auto_annotate(data=tmp_path / "train", output_dir=tmp_path / "out_train", **kw)
    assert not s.failed and (tmp_path / "out_train" / "a.txt").read_text() == EXACT_TXT  # train/a.png's boxes


def test_cli_lists_failures_without_verbose(tmp_path, small_ckpt, capsys):
    """The CLI's closing line says the failed images are "listed above": so they are, with verbose=False."""
    from segany.cli import main

    make_dataset(tmp_path, {"exact": HAND["exact"]})
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rc = main(["annotate", f"data={tmp_path / 'images'}", f"labels={tmp_path / 'labels'}",
               f"sam_model={small_ckpt}", f"output_dir={tmp_path / 'out'}", "verbose=False"])
    err = capsys.readouterr().err
    assert rc == 1 and "listed above" in err
    assert f"failed: {tmp_path / 'images' / 'broken.jpg'}: " in err.split("listed above")[0]


def test_coco_rerun_retries_failed_images(tmp_path, small_ckpt, oracle):
    make_dataset(tmp_path, HAND)
    images = tmp_path / "images"
    good = (images / "shapes.png").read_bytes()
    (images / "shapes.png").write_bytes(b"")  # fails in the first run
    kw = {"data": images, "det_model": None, "labels": tmp_path / "coco.json", "sam_model": small_ckpt,
          "format": "coco", "verbose": False}
    s = auto_annotate(output_dir=tmp_path / "out", **kw)
    assert [Path(p).name for p in s.failed] == ["shapes.png"] and len(s.written) == 3
    file = tmp_path / "out" / "annotations.json"
    first = json.loads(file.read_text())
    (images / "shapes.png").write_bytes(good)
    s = auto_annotate(output_dir=tmp_path / "out", **kw)  # redoes only the failed image
    assert [Path(p).name for p in s.written] == ["shapes.png"] and len(s.skipped_existing) == 3 and not s.failed
    assert oracle == [2, 3]  # exact.png in the first run, shapes.png in the second
    resumed = json.loads(file.read_text())
    assert resumed["images"][:3] == first["images"] and resumed["annotations"][:2] == first["annotations"]
    fresh = auto_annotate(output_dir=tmp_path / "fresh", **kw)
    assert len(fresh.written) == 4
    fresh = json.loads((tmp_path / "fresh" / "annotations.json").read_text())

    def content(doc):  # images and annotations, whatever order they were written in
        return (sorted(json.dumps(e, sort_keys=True) for e in doc["images"]),
                sorted(json.dumps({k: v for k, v in a.items() if k != "id"}, sort_keys=True)
                       for a in doc["annotations"]), doc["categories"])

    assert content(resumed) == content(fresh)
    assert len({a["id"] for a in resumed["annotations"]}) == len(resumed["annotations"]) == 5
    os.utime(file, (1_000_000, 1_000_000))
    s = auto_annotate(output_dir=tmp_path / "out", **kw)  # all done: nothing redone, the file untouched
    assert len(s.skipped_existing) == 4 and not s.written and file.stat().st_mtime == 1_000_000


def test_utf8_bom_in_labels_and_names(tmp_path, small_ckpt, oracle):
    """Files saved on Windows may start with a BOM: box labels, LabelImg's classes.txt, a COCO JSON."""
    make_dataset(tmp_path, {"exact": HAND["exact"]})
    labels = tmp_path / "labels"
    (labels / "exact.txt").write_text("\ufeff" + (labels / "exact.txt").read_text(), encoding="utf-8")
    (labels / "classes.txt").write_text("\ufeffbox\ndisc\nblob\n", encoding="utf-8")
    s = auto_annotate(data=tmp_path / "images", labels=labels, sam_model=small_ckpt, output_dir=tmp_path / "out",
                      verbose=False)
    assert not s.failed and (tmp_path / "out" / "exact.txt").read_text() == EXACT_TXT
    assert (tmp_path / "out" / "classes.txt").read_text() == "box\ndisc\nblob\n"
    coco = tmp_path / "coco.json"
    coco.write_text("\ufeff" + coco.read_text(), encoding="utf-8")
    s = auto_annotate(data=tmp_path / "images", det_model=None, labels=coco, sam_model=small_ckpt,
                      output_dir=tmp_path / "out2", verbose=False)
    assert not s.failed and (tmp_path / "out2" / "exact.txt").read_text() == EXACT_TXT
