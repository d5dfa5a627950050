"""Where :func:`segany.auto_annotate` gets its boxes: an Ultralytics YOLO detector, a folder of
YOLO detection labels, or a COCO JSON with boxes.

Every source is called as ``source(path, image) -> (xyxy, cls)``: ``(N, 4)`` float64 boxes in
pixels of the decoded image and ``(N,)`` int64 class ids, in the order the source lists them.
``names`` maps class id → name. Class ids are contiguous from 0 (what YOLO labels need); a COCO
source also keeps ``category_ids`` (class id → the JSON's category id) for COCO output.
``found`` maps each class id that the boxes of the run's images use → where (for messages), read
up front, so that names that miss a class are refused before any work (``None`` for a detector,
whose classes are only known as it runs: its ``names`` stand in). ``unmatched`` lists the label
files / COCO ``file_name``s that no image of the run matches: their boxes go unused, which the run
reports (a wrong ``data=`` would otherwise pass for images without objects).
A problem with one image's boxes raises :class:`BoxSourceError` (reported, the run goes on);
a problem with the whole source raises :class:`~segany.errors.ConfigError` before any work.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .config import check_type
from .errors import BoxSourceError, ConfigError, MissingDependencyError

DEFAULT_DET_MODEL = "yolo11x.pt"


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float64), np.zeros((0,), np.int64)


def parse_class_names(class_names: Any) -> dict[int, str] | None:
    """``None``, a list/tuple of names, a ``{id: name}`` dict, or a text file with one name per line."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, os.PathLike)):
        path = Path(class_names)
        if not path.is_file():
            raise ConfigError(f"class_names={str(class_names)!r}: no such file; give a list of names or a "
                              "text file with one name per line")
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM (Windows) is no name
        return {i: s.strip() for i, s in enumerate(lines) if s.strip()}
    if isinstance(class_names, dict):
        try:
            return {int(k): str(v) for k, v in class_names.items()}
        except (TypeError, ValueError):
            raise ConfigError("class_names as a dict must map integer class ids to names") from None
    if isinstance(class_names, Iterable):
        return {i: str(v) for i, v in enumerate(class_names)}
    raise ConfigError(f"class_names must be a list, a dict or a file path, got {type(class_names).__name__}")


def check_names_cover(names: dict[int, str], found: dict[int, str] | None, keep: list[int] | None,
                      origin: str) -> None:
    """Refuse names that miss a class id the boxes use (``keep``: only those classes are written).

    An error rather than padding the names with the ids: a YOLO trainer refuses a label whose
    class is >= ``nc`` of data.yaml, and names that stop short usually are the wrong file (another
    dataset, an off-by-one), which invented names like "7" would hide; raised before any image is
    done, so nothing is written with them."""
    if not found:
        return
    missing = sorted(c for c in found if c not in names and (keep is None or c in keep))
    if missing:
        shown = ", ".join(f"{c} ({found[c]})" for c in missing[:5]) + ", ..." * (len(missing) > 5)
        raise ConfigError(
            f"{origin} has {len(names)} name(s) (class ids {_id_range(names)}) but the boxes also use class "
            f"id(s) {shown}: a YOLO data.yaml needs a name for every class id the labels use. Give the "
            "full list of names (one per class id, in id order), or keep only the named classes with "
            "classes=[...]")


def _id_range(names: dict[int, str]) -> str:
    return f"{min(names)}..{max(names)}" if names else "none"


def check_classes(classes: Any) -> list[int] | None:
    """``classes``: None, one int, or ints (the class ids to keep)."""
    if classes is None:
        return None
    items = [classes] if isinstance(classes, (int, np.integer)) else classes
    try:
        out = [int(c) for c in items]
        if any(c != float(x) or c < 0 for c, x in zip(out, items)):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"classes must be a class id or a list of class ids (whole numbers >= 0), got {classes!r}") from None
    return out


def check_detector_options(conf: Any, iou: Any, imgsz: Any, max_det: Any) -> tuple[float, float, Any, int]:
    """The detector settings, checked whatever the box source: a bad value is an error before any
    work, never silently unused because the boxes came from labels. Types are checked as the
    command line checks them (``config.check_type``), so both give the same message."""
    conf, iou = check_type("conf", conf, 0.25), check_type("iou", iou, 0.45)
    for key, value, what in (("conf", conf, "a minimum box confidence"), ("iou", iou, "an NMS IoU threshold")):
        if value is None or not 0.0 <= value <= 1.0:  # NaN fails the range test too
            raise ConfigError(f"{key}={value}: expected {what} in [0, 1]")
    max_det = _count("max_det", max_det)
    # Ultralytics also takes imgsz=[h, w] (check_type's imgsz rule is SAM's square input).
    if isinstance(imgsz, (list, tuple)):
        if len(imgsz) not in (1, 2):
            raise ConfigError(f"imgsz={list(imgsz)!r}: give one size or [height, width], e.g. imgsz=640")
        return conf, iou, [_count("imgsz", v) for v in imgsz], max_det
    return conf, iou, _count("imgsz", imgsz), max_det


def _count(key: str, value: Any) -> int:
    value = check_type(key, value, 1)
    if value is None or value < 1:
        raise ConfigError(f"{key}={value}: expected an integer >= 1")
    return value


class YoloDetector:
    """Boxes from an Ultralytics YOLO model (``ultralytics`` is imported only here)."""

    def __init__(self, det_model: Any, conf: float, iou: float, imgsz: int, max_det: int,
                 classes: list[int] | None, device: str) -> None:
        if isinstance(det_model, (str, os.PathLike)):
            try:
                from ultralytics import YOLO
            except ImportError as e:
                raise MissingDependencyError(
                    f"det_model={str(det_model)!r} needs the 'ultralytics' package, which could not be "
                    f"imported ({e}); install it with "
                    "pip install segany[annotate] (or pip install ultralytics). Without a detector, pass "
                    "labels=<folder of YOLO box labels or a COCO .json> and det_model=None."
                ) from e
            det_model = YOLO(str(det_model))
        self.model = det_model  # an already built detector object is used as is
        self.kwargs = dict(conf=conf, iou=iou, imgsz=imgsz, max_det=max_det, classes=classes, device=device,
                           verbose=False)
        self.names = {int(k): str(v) for k, v in dict(getattr(det_model, "names", {}) or {}).items()}
        self.category_ids: dict[int, int] | None = None
        # The classes it can emit: what class_names= must name (boxes are only seen as it runs).
        self.found: dict[int, str] | None = {c: "a class of the detector" for c in self.names} or None
        self.unmatched: list[str] = []

    def __call__(self, path: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The decoded BGR array is passed (Ultralytics reads numpy input as BGR): one decode per image.
        result = self.model.predict(image, **self.kwargs)[0]
        boxes = result.boxes
        if boxes is None or len(boxes) == 0:
            return _empty()
        xyxy, cls = (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
                     for v in (boxes.xyxy, boxes.cls))
        return np.asarray(xyxy, np.float64).reshape(-1, 4), np.asarray(cls).astype(np.int64).reshape(-1)


class YoloLabels:
    """Boxes from YOLO detection labels: ``<folder>/<image stem>.txt`` with lines ``cls xc yc w h``
    (normalised; a sixth field, a confidence, is ignored). A missing file is a background image."""

    def __init__(self, folder: Path, images: list[str], class_names: dict[int, str] | None) -> None:
        self.folder = folder
        stems = {Path(p).stem for p in images}
        files = {p.stem: p for p in folder.glob("*.txt")}
        if stems and not stems & set(files):
            raise ConfigError(f"labels={str(folder)!r} holds no <image name>.txt file for any of the "
                              f"{len(stems)} image(s); YOLO box labels are matched by file stem")
        # classes.txt names classes (LabelImg) unless an image is called "classes".
        self.unmatched = sorted(f.name for stem, f in files.items() if stem not in stems and stem != "classes")
        self.names_file: Path | None = None
        if class_names is None and "classes" in files and "classes" not in stems:
            self.names_file = files["classes"]  # LabelImg writes names here
            class_names = parse_class_names(self.names_file)
        # Scanned up front so that names (and classes.txt) do not depend on which images a run
        # redoes, and so that names missing a class are refused before any work.
        self.found: dict[int, str] = {}
        for stem in sorted(stems & set(files)):
            try:
                _, cls = self._read(files[stem], 1, 1)
            except BoxSourceError:
                continue  # reported when that image comes up
            for c in cls.tolist():
                self.found.setdefault(int(c), f"e.g. in {files[stem]}")
        if class_names is None:
            class_names = {i: str(i) for i in range(max(self.found, default=-1) + 1)}
        self.names = class_names
        self.category_ids: dict[int, int] | None = None

    @staticmethod
    def _read(file: Path, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            text = file.read_text(encoding="utf-8-sig")  # -sig: files saved on Windows may start with a BOM
        except (OSError, UnicodeDecodeError) as e:
            raise BoxSourceError(f"label file {file} cannot be read ({e})") from None
        boxes, classes = [], []
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                values = []
            if len(values) not in (5, 6) or not all(math.isfinite(v) for v in values):
                raise BoxSourceError(f"{file}:{n}: expected 'cls xc yc w h' (YOLO box label), got {line.strip()!r}")
            c, xc, yc, bw, bh = values[:5]
            if c < 0 or c != int(c):
                raise BoxSourceError(f"{file}:{n}: class {fields[0]!r} is not a non-negative integer")
            if min(xc, yc, bw, bh) < 0 or max(xc, yc, bw, bh) > 1.0 + 1e-6:
                raise BoxSourceError(f"{file}:{n}: box values must be normalised to 0..1, got {line.strip()!r}")
            boxes.append([(xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h])
            classes.append(int(c))
        if not boxes:
            return _empty()
        return np.asarray(boxes, np.float64), np.asarray(classes, np.int64)

    def __call__(self, path: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        file = self.folder / f"{Path(path).stem}.txt"
        if not file.is_file():
            return _empty()
        return self._read(file, *image.shape[:2])


class CocoBoxes:
    """Boxes from a COCO JSON (``bbox`` = x, y, w, h in pixels). Images are matched by
    ``file_name``: its path relative to ``root`` first; else the entry whose whole ``file_name``
    ends the image's path (``train/a.jpg`` for ``.../train/a.jpg``); else its base name when only
    one entry has it. An image that several entries fit is an error for that image (never a
    silent guess, nor a background image). Crowd annotations (``iscrowd: 1``) are skipped: their
    box covers a group, not one object. ``image_ids`` keeps the JSON's image ids, so a COCO
    output uses the same ones."""

    def classes_of(self, category_ids: list[int] | None) -> list[int] | None:
        """``classes=`` given as the JSON's category ids (what the file and a COCO output show) →
        the class ids of the boxes (0..K-1 in id order); an id the file lacks is an error."""
        if category_ids is None:
            return None
        to_class = {cid: k for k, cid in self.category_ids.items()}
        unknown = [c for c in category_ids if c not in to_class]
        if unknown:
            raise ConfigError(f"classes={category_ids}: with boxes from a COCO JSON, classes are its category ids; "
                              f"{unknown} not among them ({sorted(to_class)})")
        return [to_class[c] for c in category_ids]

    def __init__(self, file: Path, images: list[str], root: Path | None) -> None:
        try:
            # -sig: json.loads refuses a BOM, which files saved on Windows may start with.
            data = json.loads(file.read_text(encoding="utf-8-sig"))
            cats = sorted(data["categories"], key=lambda c: int(c["id"]))
            entries = data["images"]
            anns = data.get("annotations", [])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"labels={str(file)!r} is not a COCO JSON with images and categories ({e})") from None
        # YOLO class ids must be 0..K-1: categories are numbered in the order of their ids.
        self.category_ids = {k: int(c["id"]) for k, c in enumerate(cats)}
        self.names = {k: str(c.get("name", c["id"])) for k, c in enumerate(cats)}
        to_class = {cid: k for k, cid in self.category_ids.items()}
        by_name: dict[str, list[dict]] = {}
        by_base: dict[str, list[dict]] = {}
        for e in entries:
            name = str(e["file_name"]).replace("\\", "/")
            by_name.setdefault(name, []).append(e)
            by_base.setdefault(name.rsplit("/", 1)[-1], []).append(e)
        self.entry: dict[str, dict] = {}
        self.ambiguous: dict[str, list[str]] = {}  # image → the file_names it could be
        matched: set[int] = set()  # id() of the entries that some image fits
        for p in images:
            found = self._match(p, root, by_name, by_base)
            matched.update(id(e) for e in found)
            if len(found) == 1:
                self.entry[p] = found[0]
            elif found:
                self.ambiguous[p] = [str(e["file_name"]) for e in found]
        self.image_ids = {p: int(e["id"]) for p, e in self.entry.items()}  # kept in COCO output
        self.unmatched = [str(e["file_name"]) for e in entries if id(e) not in matched]
        if images and not self.entry and not self.ambiguous:
            raise ConfigError(f"labels={str(file)!r}: no image of the COCO JSON matches any of the "
                              f"{len(images)} image(s) by file_name")
        self.boxes: dict[Any, list[tuple[list[float], int]]] = {}
        for a in anns:
            if a.get("iscrowd", 0) or "bbox" not in a:
                continue
            self.boxes.setdefault(a["image_id"], []).append((a["bbox"], to_class.get(a.get("category_id"), -1)))
        self.found: dict[int, str] = {}
        for e in self.entry.values():
            for _, c in self.boxes.get(e["id"], []):
                if c >= 0:
                    self.found.setdefault(c, f"e.g. in {file}, image {e['file_name']}")

    @staticmethod
    def _match(path: str, root: Path | None, by_name: dict[str, list[dict]],
               by_base: dict[str, list[dict]]) -> list[dict]:
        """The entries that fit ``path``, most specific rule first (see the class docstring)."""
        if root is not None:
            found = by_name.get(Path(os.path.relpath(path, root)).as_posix())
            if found:
                return found
        candidates = by_base.get(Path(path).name, [])
        if len(candidates) < 2:
            return candidates
        parts = Path(os.path.abspath(path)).as_posix().split("/")
        # file_name "train/a.jpg" fits ".../train/a.jpg" but not ".../val/a.jpg".
        fits = [e for e in candidates
                if (n := [q for q in str(e["file_name"]).replace("\\", "/").split("/") if q not in ("", ".")])
                and parts[-len(n):] == n]
        return fits if len(fits) == 1 else candidates

    def __call__(self, path: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if path in self.ambiguous:
            raise BoxSourceError(f"its base name matches {len(self.ambiguous[path])} images of the COCO JSON "
                                 f"({', '.join(self.ambiguous[path])}) and its path tells none apart: make "
                                 "file_name unique or relative to data=")
        entry = self.entry.get(path)
        if entry is None:
            return _empty()  # not in the JSON: a background image, like a missing YOLO label file
        h, w = image.shape[:2]
        if (entry.get("width", w), entry.get("height", h)) != (w, h):
            raise BoxSourceError(f"the COCO JSON says {entry.get('width')}x{entry.get('height')} but the image "
                                 f"is {w}x{h}: its boxes would not fit")
        items = self.boxes.get(entry["id"], [])
        if any(c < 0 for _, c in items):
            raise BoxSourceError("an annotation has a category_id missing from the JSON's categories")
        try:
            xywh = np.asarray([b for b, _ in items], np.float64).reshape(-1, 4)
        except (TypeError, ValueError):
            raise BoxSourceError("a bbox is not four numbers [x, y, w, h]") from None
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        return xyxy, np.asarray([c for _, c in items], np.int64)


def make_box_source(det_model: Any, labels: Any, images: list[str], root: Path | None, class_names: Any,
                    conf: float, iou: float, imgsz: int, max_det: int, classes: list[int] | None, device: str):
    """The box source the arguments ask for (``labels`` wins over the default detector)."""
    names = parse_class_names(class_names)
    if labels is not None:
        if det_model is not None and det_model != DEFAULT_DET_MODEL:
            raise ConfigError("give det_model=... (a detector) or labels=... (existing boxes), not both")
        path = Path(labels)
        if path.is_dir():
            source = YoloLabels(path, images, names)
        elif path.is_file() and path.suffix.lower() == ".json":
            source = CocoBoxes(path, images, root)
            classes = source.classes_of(classes)
        else:
            raise ConfigError(f"labels={str(labels)!r} must be a folder of YOLO box labels (<image stem>.txt) "
                              "or a COCO .json file")
    elif det_model is None:
        raise ConfigError("no boxes: give det_model=<YOLO detector> or labels=<YOLO labels folder or COCO .json>")
    else:
        source = YoloDetector(det_model, conf, iou, imgsz, max_det, classes, device)
    if names is not None:
        source.names = names
        origin = f"class_names={str(class_names)!r}" if isinstance(class_names, (str, os.PathLike)) else "class_names"
    else:  # names of the source itself: only a LabelImg classes.txt can miss a class
        origin = str(getattr(source, "names_file", None) or "the names")
    check_names_cover(source.names, source.found, classes, origin)
    source.keep = classes  # the source's own class ids to keep (None: all)
    return source
