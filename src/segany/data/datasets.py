"""Segmentation datasets as ``(image, instance masks)`` samples: COCO JSON (polygons or RLE) and
YOLO-seg labels, plus :func:`load_dataset`, which picks the reader for a path.

Images are BGR uint8 ``(H, W, 3)`` as everywhere in segany (OpenCV's order); masks are
``(N, H, W)`` bool, one per instance; ``classes`` are ``(N,)`` int (COCO category id, YOLO class).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import ConfigError, DatasetNotFoundError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Sample:
    """One image and its instance masks."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    masks: np.ndarray  # (N, H, W) bool
    classes: np.ndarray  # (N,) int64
    path: str = ""


class SegDataset:
    """A sized, indexable collection of :class:`Sample` (subclasses implement both)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        raise NotImplementedError

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class ListDataset(SegDataset):
    """Samples held in a list (tests, small in-memory sets)."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def _read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image '{path}'")
    return img


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) → ``(h, w)`` bool."""
    from pycocotools import mask as mask_utils

    problem = segmentation_problem(seg, h, w)
    if problem:
        raise ValueError(problem)
    if isinstance(seg, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, dict):  # compressed RLE, counts as str
        rle = dict(seg, counts=seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"])
    else:
        raise ValueError(f"unsupported COCO segmentation of type {type(seg).__name__}")
    return mask_utils.decode(rle).astype(bool)


def segmentation_problem(seg: Any, h: int | None = None, w: int | None = None) -> str | None:
    """Why a COCO ``segmentation`` cannot be read (for an image of ``h × w`` if given), or None.
    An empty list is fine: an annotation without a mask, skipped like a crowd."""
    if isinstance(seg, list):
        if any(not isinstance(p, (list, tuple)) for p in seg):
            return ("a flat list of numbers; polygons are a list of lists, "
                    "[[x1, y1, x2, y2, ...], ...]")
        for p in seg:
            if len(p) % 2 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in p):
                return f"a polygon of {len(p)} values that are not x, y pairs of finite numbers"
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "an RLE without 'counts' and 'size'"
        size = seg["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            return f"an RLE of size {size!r}; expected [height, width]"
        if h is not None and w is not None and list(size) != [h, w]:
            return f"an RLE of size {list(size)} on an image of {h}×{w} (height, width)"
        return None
    return f"a segmentation of type {type(seg).__name__}; expected polygons or an RLE"


class CocoDataset(SegDataset):
    """A COCO instance-segmentation JSON; images are looked up beside it (``file_name`` relative to
    ``images_dir``, default: the JSON's folder, then its ``images/`` subfolder). Crowd annotations
    and images without annotations are skipped."""

    def __init__(self, json_path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                 keep_empty: bool = False) -> None:
        self.json_path = Path(json_path)
        # Malformed content is an error naming the file and annotation, raised here, before any
        # training: skipping it would train on a silently smaller or wrong set. (An annotation with
        # an empty segmentation is not malformed: it has no mask, and training skips that image.)
        try:
            doc = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.json_path}: not a valid JSON file ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            raise ConfigError(f"{self.json_path}: no 'images' list; not a COCO instance-segmentation file")
        self.images_dir = Path(images_dir) if images_dir else None
        sizes = {}
        for k, im in enumerate(doc["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise ConfigError(f"{self.json_path}: images[{k}] lacks 'id' or 'file_name'")
            sizes[im["id"]] = (im.get("height"), im.get("width"))
        anns: dict[int, list[dict]] = {}
        for k, a in enumerate(doc.get("annotations", [])):
            where = f"{self.json_path}: annotation id={a.get('id', '?')} (annotations[{k}])" if isinstance(a, dict) \
                else f"{self.json_path}: annotations[{k}]"
            if not isinstance(a, dict) or "image_id" not in a or "segmentation" not in a:
                raise ConfigError(f"{where} lacks 'image_id' or 'segmentation' (segany trains on instance masks; "
                                  "a detection-only file has boxes alone)")
            if a.get("iscrowd", 0):
                continue
            problem = segmentation_problem(a["segmentation"], *sizes.get(a["image_id"], (None, None)))
            if problem:
                raise ConfigError(f"{where}: segmentation is {problem}")
            anns.setdefault(a["image_id"], []).append(a)
        self.images = [im for im in doc["images"] if keep_empty or anns.get(im["id"])]
        self.anns = anns

    def __len__(self) -> int:
        return len(self.images)

    def _image_path(self, file_name: str) -> Path:
        roots = [self.images_dir] if self.images_dir else [self.json_path.parent, self.json_path.parent / "images"]
        for root in roots:
            if (root / file_name).is_file():
                return root / file_name
        return roots[0] / file_name

    def __getitem__(self, i: int) -> Sample:
        im = self.images[i]
        path = self._image_path(im["file_name"])
        image = _read_image(path)
        h, w = image.shape[:2]
        masks, classes = [], []
        for a in self.anns.get(im["id"], []):
            try:  # the JSON's height/width were checked; the file itself may differ
                m = decode_segmentation(a["segmentation"], h, w)
            except ValueError as e:
                raise ConfigError(f"{self.json_path}: annotation id={a.get('id', '?')} on '{path}': "
                                  f"segmentation is {e}") from None
            if m.any():
                masks.append(m)
                classes.append(int(a.get("category_id", 0)))
        stack = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        return Sample(image, stack, np.asarray(classes, np.int64), str(path))


class YoloSegDataset(SegDataset):
    """YOLO-seg labels: one ``class x1 y1 x2 y2 ...`` line (normalised polygon) per instance in
    ``labels/<stem>.txt`` for each image in ``images/`` (Ultralytics' layout, also with split
    folders such as ``images/train`` ↔ ``labels/train``). Images without a label file are skipped."""

    def __init__(self, images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None,
                 keep_empty: bool = False) -> None:
        self.images_dir = Path(images_dir)
        self.labels_dir = Path(labels_dir) if labels_dir else _labels_dir_for(self.images_dir)
        files = sorted(p for p in self.images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.items = [(p, self._label(p)) for p in files]
        if not keep_empty:
            self.items = [(p, lab) for p, lab in self.items if lab.is_file() and lab.stat().st_size > 0]
        for _, label in self.items:  # a malformed line fails here, before training, not mid-epoch
            if label.is_file():
                for n, vals in self._polygon_lines(label):
                    _yolo_polygon(vals, f"{label}:{n}")

    def _label(self, image: Path) -> Path:
        return (self.labels_dir / image.relative_to(self.images_dir)).with_suffix(".txt")

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _polygon_lines(label: Path) -> list[tuple[int, list[str]]]:
        """The polygon lines of a label file as (line number, values). Fewer than 3 points (a
        detection box line, "cls x y w h") is no mask: the image is skipped by training like an
        empty one. A line that cannot be read is an error naming it: guessing would train on wrong masks."""
        lines = enumerate(label.read_text(encoding="utf-8-sig").splitlines(), 1)
        return [(n, vals) for n, line in lines if len(vals := line.split()) >= 7]

    def __getitem__(self, i: int) -> Sample:
        path, label = self.items[i]
        image = _read_image(path)
        h, w = image.shape[:2]
        masks, classes = [], []
        for n, vals in self._polygon_lines(label) if label.is_file() else ():
            xy = _yolo_polygon(vals, f"{label}:{n}") * np.array([w, h])
            m = np.zeros((h, w), np.uint8)
            cv2.fillPoly(m, [np.round(xy * 4).astype(np.int32)], 1, shift=2)
            if m.any():
                masks.append(m.astype(bool))
                classes.append(int(float(vals[0])))
        stack = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        return Sample(image, stack, np.asarray(classes, np.int64), str(path))


def _yolo_polygon(vals: list[str], where: str) -> np.ndarray:
    """A YOLO-seg line's normalised polygon ``(K, 2)``, or a :class:`ConfigError` naming ``where``."""
    try:
        cls = float(vals[0])
    except ValueError:
        cls = math.nan
    if not (cls.is_integer() and cls >= 0):  # "0" and "0.0" are class 0; "person" is not
        raise ConfigError(f"{where}: class {vals[0]!r} is not a whole number >= 0 (YOLO labels hold class indices)")
    if len(vals[1:]) % 2:
        raise ConfigError(f"{where}: {len(vals) - 1} coordinates, an odd number; expected x y pairs")
    try:
        xy = np.asarray(vals[1:], np.float64).reshape(-1, 2)
    except ValueError:
        raise ConfigError(f"{where}: coordinates that are not numbers") from None
    # Normalised coordinates: a little outside [0, 1] is rounding, more is pixels or garbage.
    if not np.isfinite(xy).all() or (xy < -0.01).any() or (xy > 1.01).any():
        raise ConfigError(f"{where}: coordinates outside [0, 1] or not finite; YOLO-seg coordinates are "
                          "normalised by the image width and height")
    return xy.clip(0, 1)


def _labels_dir_for(images_dir: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder in the path becomes ``labels``."""
    parts = list(images_dir.parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts)
    return images_dir.parent / "labels"


def load_dataset(data: Any) -> SegDataset:
    """A dataset from what a user passes as ``data=``.

    - a :class:`SegDataset` (or a list of :class:`Sample`): used as it is;
    - ``"synthetic"`` or ``"synthetic:N"`` / ``"synthetic:N:SEED"``: the built-in generator;
    - a ``.json`` file: COCO;
    - a folder holding a COCO JSON (``annotations.json`` or a single ``*.json``): COCO;
    - a folder with ``images/`` and ``labels/`` (or an ``images`` folder itself): YOLO-seg.
    """
    if isinstance(data, SegDataset):
        return data
    if isinstance(data, (list, tuple)) and all(isinstance(s, Sample) for s in data):
        return ListDataset(list(data))
    text = str(data)
    if text == "synthetic" or text.startswith("synthetic:"):
        from .synthetic import SyntheticDataset

        parts = text.split(":")
        try:
            n = int(parts[1]) if len(parts) > 1 and parts[1] else 1000
            seed = int(parts[2]) if len(parts) > 2 else 0
            if n < 1 or seed < 0 or len(parts) > 3:
                raise ValueError
        except ValueError:
            raise ConfigError(f"data={text!r}: write synthetic, synthetic:N or synthetic:N:SEED "
                              "(N images >= 1, SEED >= 0)") from None
        return SyntheticDataset(n=n, seed=seed)
    path = Path(text)
    if path.is_file() and path.suffix.lower() == ".json":
        return CocoDataset(path)
    if path.is_dir():
        jsons = sorted(path.glob("*.json"))
        if (path / "annotations.json").is_file():
            return CocoDataset(path / "annotations.json")
        if len(jsons) == 1:
            return CocoDataset(jsons[0])
        if (path / "images").is_dir():
            return YoloSegDataset(path / "images")
        if path.name == "images":
            return YoloSegDataset(path)
    raise DatasetNotFoundError(
        f"no segmentation dataset at '{data}': expected a COCO .json, a folder with annotations.json, "
        "a YOLO-seg folder with images/ and labels/, or 'synthetic[:N[:SEED]]'"
    )
