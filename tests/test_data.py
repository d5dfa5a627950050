"""Synthetic dataset generator and the COCO / YOLO-seg readers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segany.data import CocoDataset, SyntheticDataset, YoloSegDataset, load_dataset, make_sample, write_synthetic
from segany.errors import ConfigError


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_synthetic_is_deterministic_and_varied():
    a, b = make_sample(3, 96), make_sample(3, 96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    c = make_sample(4, 96)
    assert not np.array_equal(a.image, c.image)
    ds = SyntheticDataset(12, seed=1, size=(80, 120))
    counts = [len(s.masks) for s in ds]
    assert max(counts) > 1  # some images hold several objects
    for s in ds:
        assert s.image.shape == (80, 120, 3) and s.image.dtype == np.uint8
        assert s.masks.shape[1:] == (80, 120) and s.masks.dtype == bool
        assert len(s.classes) == len(s.masks)
        assert (s.masks.sum(0) <= 1).all()  # visible parts: instances never overlap
        assert all(m.sum() >= 64 for m in s.masks)


def test_synthetic_without_photos():
    s = SyntheticDataset(3, seed=0, size=64, photos=False)[2]
    assert s.image.shape == (64, 64, 3)


def test_coco_round_trip_is_exact(tmp_path):
    out = write_synthetic(tmp_path / "coco", n=4, seed=2, size=96, format="coco")
    ds = load_dataset(out)
    assert isinstance(ds, CocoDataset)
    ref = SyntheticDataset(4, seed=2, size=96)
    assert len(ds) == sum(1 for s in ref if len(s.masks))
    for got, want in zip(ds, (s for s in ref if len(s.masks))):
        assert np.array_equal(got.image, want.image)  # PNG: lossless
        assert np.array_equal(got.masks, want.masks)
        assert list(got.classes) == [c + 1 for c in want.classes]  # COCO category ids start at 1
    doc = json.loads((out / "annotations.json").read_text())
    assert {c["name"] for c in doc["categories"]} == {"rectangle", "ellipse", "polygon", "star"}


def test_yolo_round_trip(tmp_path):
    out = write_synthetic(tmp_path / "yolo", n=4, seed=2, size=96, format="yolo")
    ds = load_dataset(out)
    assert isinstance(ds, YoloSegDataset)
    ref = [s for s in SyntheticDataset(4, seed=2, size=96) if len(s.masks)]
    assert len(ds) == len(ref)
    for got, want in zip(ds, ref):
        assert list(got.classes) == list(want.classes)
        # A polygon keeps the largest part of an occluded object: compare with some slack.
        assert all(_iou(g, w) > 0.8 for g, w in zip(got.masks, want.masks))


def test_coco_polygons_and_uncompressed_rle(tmp_path):
    import cv2

    img = np.zeros((40, 50, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    rle = {"size": [40, 50], "counts": [10 * 40 + 5, 10, 30, 10, 40 * 50 - 10 * 40 - 5 - 50]}
    doc = dict(images=[dict(id=1, file_name="a.png", height=40, width=50)], categories=[dict(id=7, name="x")],
               annotations=[dict(id=1, image_id=1, category_id=7, segmentation=[[10, 10, 30, 10, 30, 20, 10, 20]]),
                            dict(id=2, image_id=1, category_id=7, segmentation=rle),
                            dict(id=3, image_id=1, category_id=7, segmentation=rle, iscrowd=1)])
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    s = load_dataset(tmp_path / "ann.json")[0]
    assert s.masks.shape == (2, 40, 50)  # the crowd annotation is skipped
    assert s.masks[0][15, 20] and not s.masks[0][5, 5]
    assert s.masks[1].sum() == 20 and s.masks[1][5:15, 10:12].all()  # two columns of 10 from (10, 5)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no segmentation dataset"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(ConfigError, match="synthetic:N:SEED"):
        load_dataset("synthetic:abc")
    assert len(load_dataset("synthetic:5:1")) == 5


def _coco(tmp_path, annotations, **doc):
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 50, 3), np.uint8))
    doc = dict(dict(images=[dict(id=1, file_name="a.png", height=40, width=50)], annotations=annotations), **doc)
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    return tmp_path / "ann.json"


@pytest.mark.parametrize("ann,match", [
    (dict(id=5, image_id=1), r"annotation id=5 \(annotations\[0\]\) lacks 'image_id' or 'segmentation'"),
    (dict(id=6, image_id=1, segmentation=[10, 10, 30, 10, 30, 20]), "annotation id=6 .*flat list of numbers"),
    (dict(id=7, image_id=1, segmentation=[[10, 10, 30, 10, 30]]), "annotation id=7 .*polygon of 5 values"),
    (dict(id=8, image_id=1, segmentation=dict(size=[60, 80], counts=[4800])),
     r"annotation id=8 .*RLE of size \[60, 80\] on an image of 40×50")])
def test_bad_coco_annotations_name_file_and_id(tmp_path, ann, match):
    path = _coco(tmp_path, [ann])
    with pytest.raises(ConfigError, match=match) as e:
        load_dataset(path)
    assert str(path) in str(e.value)


def test_bad_coco_files(tmp_path):
    path = _coco(tmp_path, [])
    path.write_text(json.dumps(dict(annotations=[])))
    with pytest.raises(ConfigError, match="no 'images' list"):
        load_dataset(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid JSON file"):
        load_dataset(path)
    # the JSON's size is right but the image file differs: caught when the image is read
    path = _coco(tmp_path, [dict(id=9, image_id=1, segmentation=dict(size=[40, 50], counts=[2000]))])
    doc = json.loads(path.read_text())
    doc["images"][0].pop("height")
    doc["annotations"][0]["segmentation"]["size"] = [20, 100]
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"annotation id=9 on .*a.png.*RLE of size \[20, 100\]"):
        load_dataset(path)[0]
    # an empty segmentation is not malformed: an annotation without a mask
    assert len(load_dataset(_coco(tmp_path, [dict(id=1, image_id=1, segmentation=[])]))[0].masks) == 0


@pytest.mark.parametrize("line,match", [("0 0.1 0.1 0.5 0.1 0.5 0.5 0.3", "7 coordinates, an odd number"),
                                        ("person 0.1 0.1 0.5 0.1 0.5 0.5", "class 'person' is not a whole"),
                                        ("0 nan 0.1 0.5 0.1 0.5 0.5", r"outside \[0, 1\] or not finite"),
                                        ("0 1e12 0.1 0.5 0.1 0.5 0.5", r"outside \[0, 1\]"),
                                        ("0 10 10 50 10 50 50", r"outside \[0, 1\]")])
def test_bad_yolo_lines_name_file_and_line(tmp_path, line, match):
    import cv2

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((40, 50, 3), np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n" + line + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_dataset(tmp_path)  # when the dataset is opened, not when training reaches the image
    assert "a.txt:2" in str(e.value)


def test_yolo_box_lines_give_no_masks(tmp_path):
    import cv2

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((40, 50, 3), np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n2.0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    s = load_dataset(tmp_path)[0]
    assert s.masks.shape == (1, 40, 50) and s.classes.tolist() == [2]  # the box line is no mask
    # a file saved with a byte-order mark (Windows editors) reads the same
    (tmp_path / "labels" / "a.txt").write_text("3 0.1 0.1 0.5 0.1 0.5 0.5\n", encoding="utf-8-sig")
    assert load_dataset(tmp_path)[0].classes.tolist() == [3]
