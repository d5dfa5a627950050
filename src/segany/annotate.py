"""``auto_annotate``: boxes (a detector, YOLO box labels or a COCO JSON) → SAM masks → a
segmentation dataset (SPEC §8).

Choices worth knowing:

- **One prompt call per image.** The image is encoded once and all its boxes go through the
  decoder together (``multimask_output=False``); mask ``i`` belongs to box ``i``.
- **Classes never shift.** A box whose mask comes out empty, or that lies off the image, is
  skipped and listed in ``summary.empty_masks``; every other object keeps its own box's class
  (the reference shifts classes onto the wrong masks).
  Both formats keep the same objects.
- **YOLO-seg output**: ``<output_dir>/<image stem>.txt``, lines ``cls x1 y1 x2 y2 ...`` normalised
  to 0..1 (6 decimals). A mask of several parts becomes ONE polygon, its parts joined by
  zero-width bridges exactly as ``Results.masks.xy`` does (holes are filled); filling the polygon
  gives the parts back. ``write_names=True`` adds ``classes.txt`` and a minimal ``data.yaml``.
- **No detections → an empty label file.** YOLO trainers read an empty (or missing) label file
  as a background image; the empty file also marks the image as done for a rerun.
- **Atomic and resumable.** Each label file is written whole (temp file + ``os.replace``); a
  rerun skips images whose label file exists (``overwrite=True`` redoes them) and removes temp
  files left by a killed run. Failed images get no file, so a rerun retries them.
- **COCO output** (``format="coco"``): one ``<output_dir>/annotations.json`` with RLE masks,
  written atomically at the end; a killed COCO run leaves nothing and starts over. The images
  listed in that file are the done ones: a rerun redoes only the others (the failed ones) and
  rewrites the file with all of them, the earlier images and annotations kept as they are
  (``overwrite=True`` redoes everything). Category ids are the class ids (the JSON's own ids when
  the boxes came from a COCO JSON).
- **Class names cover the boxes.** Names (``class_names``, a LabelImg ``classes.txt`` in the
  labels folder) that miss a class id the boxes use are refused before any image is done: a
  data.yaml whose ``nc`` is below a label's class is a broken dataset.
- **Errors per image** (unreadable image, malformed label file, an ambiguous COCO match, a SAM
  failure) are reported in ``summary.failed`` and do not stop the run; they are listed on stderr
  even when ``verbose=False``. ``conf``, ``iou``, ``imgsz`` and ``max_det`` apply to the detector
  only, but are checked whatever the box source (a bad value is an error, not silently unused);
  ``classes`` filters every box source.
- **Boxes without an image are reported.** Label files, or images of a COCO JSON, that match no
  image of ``data`` get a warning naming them and are counted in the summary (``not_in_data``).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from .annotate_boxes import (DEFAULT_DET_MODEL, BoxSourceError, check_classes, check_detector_options,
                             make_box_source)
from .annotate_output import add_coco, coco_image_ids, read_coco, write_class_names, write_coco
from .engine.export import atomic_write_text, to_numpy, yolo_line
from .engine.sources import VIDEO_EXTENSIONS, expand_sources, load_image
from .errors import ConfigError, ImageError, SegAnyError, warn

COCO_FILE = "annotations.json"
# Temp files of export.atomic_write_bytes: ".<name>.<pid>.<8 hex>.tmp".
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class EmptyMask(NamedTuple):
    """A box that gave no usable mask: ``index`` is its position among the image's boxes."""

    image: str
    index: int
    cls: int
    reason: str


@dataclass
class AnnotateSummary:
    """What a run did. Lists hold image paths; ``written`` includes the images that got an
    empty file (``no_detections``); ``failed`` maps image path → reason; ``not_in_data`` holds the
    label files / COCO ``file_name``s of the box source that match no image of ``data`` (their
    boxes went unused; a warning names them too)."""

    written: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    no_detections: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    empty_masks: list[EmptyMask] = field(default_factory=list)
    not_in_data: list[str] = field(default_factory=list)  # label files / COCO file_names of no image in data
    output_dir: str = ""
    elapsed: float = 0.0

    def __str__(self) -> str:
        rate = len(self.written) / self.elapsed if self.elapsed > 0 else 0.0
        unused = f", {len(self.not_in_data)} labelled image(s) not in data (boxes unused)" if self.not_in_data else ""
        lines = [
            f"auto_annotate: {len(self.written)} image(s) written ({len(self.no_detections)} without detections), "
            f"{len(self.skipped_existing)} skipped (labels exist), {len(self.failed)} failed, "
            f"{len(self.empty_masks)} empty mask(s) skipped{unused}; {self.elapsed:.1f}s ({rate:.2f} images/s) "
            f"→ {self.output_dir}"
        ]
        lines += self.failure_lines()
        lines += [f"  no mask: {e.image} box {e.index} (class {e.cls}): {e.reason}" for e in self.empty_masks]
        return "\n".join(lines)

    def failure_lines(self) -> list[str]:
        return [f"  failed: {path}: {reason}" for path, reason in self.failed.items()]


def auto_annotate(
    data: Any,
    det_model: Any = DEFAULT_DET_MODEL,
    sam_model: Any = "sam_b.pt",
    device: str = "",
    conf: float = 0.25,
    iou: float = 0.45,
    imgsz: int = 640,
    max_det: int = 300,
    classes: Any = None,
    output_dir: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    format: str = "yolo",
    overwrite: bool = False,
    class_names: Any = None,
    write_names: bool = True,
    verbose: bool = True,
) -> AnnotateSummary:
    """Segment every image of ``data`` (folder, file, glob or list of paths) from boxes and write labels.

    Boxes come from ``labels`` (a folder of YOLO box labels ``<stem>.txt``, or a COCO ``.json``)
    when given, else from the Ultralytics detector ``det_model`` (needs ``pip install
    segany[annotate]``). ``sam_model``: a checkpoint name/path or a :class:`segany.SAM`.
    ``class_names`` (list, dict or text file) overrides the source's names. Returns an
    :class:`AnnotateSummary` (printed when ``verbose``). See the module docstring for the rules.
    """
    t0 = time.perf_counter()
    if format not in ("yolo", "coco"):
        raise ConfigError(f"format={format!r}: use 'yolo' (one .txt per image) or 'coco' (one JSON)")
    keep = check_classes(classes)
    conf, iou, imgsz, max_det = check_detector_options(conf, iou, imgsz, max_det)
    summary = AnnotateSummary()
    items = expand_sources(data)
    if any(not isinstance(p, (str, os.PathLike)) for p in items):
        raise ConfigError("auto_annotate needs image files (labels are named after them), not in-memory images")
    paths = [os.fspath(p) for p in items]
    for p in paths:
        if os.path.splitext(p)[1].lower() in VIDEO_EXTENSIONS:
            summary.failed[p] = "videos are not annotated; extract their frames as images first"
    paths = [p for p in paths if p not in summary.failed]
    root = Path(os.path.expanduser(os.fspath(data))) if isinstance(data, (str, os.PathLike)) else None
    root = root if root is not None and root.is_dir() else None  # COCO file_name is relative to it
    out = Path(output_dir) if output_dir is not None else _default_output_dir(data)
    if labels is not None and out.resolve() == Path(labels).resolve():
        raise ConfigError(f"output_dir={str(out)!r} is the labels folder: the box labels would be overwritten")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} is a file: give a folder for the labels")
    summary.output_dir = str(out)
    source = make_box_source(det_model, labels, paths, root, class_names, conf, iou, imgsz, max_det, keep, device)
    summary.not_in_data = list(source.unmatched)
    _warn_not_in_data(labels, summary.not_in_data)
    if out.is_dir():  # else it is made by the first file written: a run that fails first leaves none
        _remove_stale_temps(out)

    coco_file = out / COCO_FILE
    resumed = format == "coco" and coco_file.exists() and not overwrite
    # YOLO: image → its label file; COCO: image → its file_name in annotations.json.
    targets = _label_files(paths, out, summary) if format == "yolo" else _coco_names(paths, root, summary)
    coco = read_coco(coco_file) if resumed else {"images": [], "annotations": [], "last_ann": 0}
    done = {str(e["file_name"]): int(e["id"]) for e in coco["images"]}  # COCO: file_name → image id
    image_ids = coco_image_ids(paths, getattr(source, "image_ids", {}),
                                {p: done[n] for p, n in targets.items() if n in done}, set(done.values()))
    predictor = None
    found_boxes = kept_boxes = 0  # boxes before and after the classes filter
    seen: set[int] = set()  # classes written (a detector may emit one its names lack)
    # Iterating the bar counts an image when the next one is asked for: the rate is images done per second.
    bar = tqdm(list(targets.items()), desc="auto_annotate", unit="img", disable=not verbose)
    try:
        for path, target in bar:
            if target in done or (format == "yolo" and target.exists() and not overwrite):
                summary.skipped_existing.append(path)
                continue
            try:
                image = load_image(path)
                xyxy, cls = source(path, image)
            except (ImageError, BoxSourceError, OSError) as e:
                summary.failed[path] = str(e)
                continue
            if source.keep is not None:
                found_boxes += len(xyxy)
                xyxy, cls = xyxy[np.isin(cls, source.keep)], cls[np.isin(cls, source.keep)]
                kept_boxes += len(xyxy)
            if predictor is None and len(xyxy):
                predictor = _load_sam(sam_model, device)
            try:
                objects = _segment(predictor, path, image, xyxy, cls, summary) if len(xyxy) else []
            except (SegAnyError, RuntimeError, ValueError) as e:  # RuntimeError: e.g. out of memory
                summary.failed[path] = f"SAM failed: {e}"
                continue
            if not len(xyxy):
                summary.no_detections.append(path)
            if format == "yolo":
                atomic_write_text(target, "".join(yolo_line(c, poly) + "\n" for c, poly, *_ in objects))
            else:
                add_coco(coco, image_ids[path], target, image.shape[:2], objects, source.category_ids)
            seen.update(c for c, *_ in objects)
            summary.written.append(path)
    finally:
        bar.close()
    names = _names_for(source.names, seen)
    if format == "coco" and (not resumed or summary.written):
        write_coco(coco_file, coco, names, source.category_ids)
    elif format == "yolo" and write_names:
        write_class_names(out, names, clash="classes" in {t.stem for t in targets.values()})
    if found_boxes and not kept_boxes:
        warn(f"classes={keep} kept none of the {found_boxes} boxes found: the label files written are "
             "empty (check the class ids; a rerun skips these images unless overwrite=True)")
    summary.elapsed = time.perf_counter() - t0
    if verbose:
        print(summary)
    elif summary.failed:
        # Errors are not chatter: a caller (the CLI says "listed above") must be able to see them.
        print(f"auto_annotate: {len(summary.failed)} image(s) failed:", *summary.failure_lines(), sep="\n",
              file=sys.stderr)
    return summary


def _warn_not_in_data(labels: Any, names: list[str]) -> None:
    """Say that boxes go unused: silence would let a wrong ``data=`` (or a misnamed folder) pass
    for a run that found fewer objects. A warning, not an error: a subset of the labelled images
    is a fair thing to annotate."""
    if names:
        shown = ", ".join(names[:5]) + ", ..." * (len(names) > 5)
        warn(f"labels={str(labels)!r} has boxes for {len(names)} image(s) that data does not hold ({shown}): "
             "their boxes are not used; check data= (ignore this if data is a subset on purpose)")


def _default_output_dir(data: Any) -> Path:
    """``<data>_auto_annotate_labels`` beside ``data`` (as the reference does)."""
    if not isinstance(data, (str, os.PathLike)) or any(c in os.fspath(data) for c in "*?["):
        raise ConfigError("data is a list or a glob: give output_dir=... for the labels")
    p = Path(os.path.expanduser(os.fspath(data))).resolve()
    return p.parent / f"{p.name if p.is_dir() else p.stem}_auto_annotate_labels"


def _label_files(paths: list[str], out: Path, summary: AnnotateSummary) -> dict[str, Path]:
    """Image → ``<out>/<stem>.txt``; a second image with the same stem is reported, not overwritten."""
    owner: dict[str, str] = {}
    targets: dict[str, Path] = {}
    for p in paths:
        stem = Path(p).stem
        if stem in owner:
            summary.failed[p] = f"same file stem as {owner[stem]}: both would need the label file {stem}.txt"
            continue
        owner[stem] = p
        targets[p] = out / f"{stem}.txt"
    return targets


def _coco_names(paths: list[str], root: Path | None, summary: AnnotateSummary) -> dict[str, str]:
    """Image → its ``file_name`` in annotations.json (relative to ``data``, else the base name);
    a second image with the same name is reported: a rerun tells done images by that name."""
    owner: dict[str, str] = {}
    names: dict[str, str] = {}
    for p in paths:
        name = Path(os.path.relpath(p, root)).as_posix() if root is not None else Path(p).name
        if name in owner:
            summary.failed[p] = f"same file name as {owner[name]}: both would be {name!r} in {COCO_FILE}"
            continue
        owner[name] = names[p] = name
    return names


def _names_for(names: dict[int, str], seen: set[int]) -> dict[int, str]:
    """``names`` with a name for every class written. Box sources named up front are checked
    before the run (make_box_source); only a detector can still emit a class its names lack, and
    its labels are written by then: the id stands in as the name, with a warning."""
    missing = sorted(seen - set(names))
    if not missing:
        return names
    warn(f"the boxes used class id(s) {missing} that the class names do not name: their names are the ids; "
         "pass class_names=[...] with a name for every class id")
    return {**names, **{c: str(c) for c in missing}}


def _remove_stale_temps(out: Path) -> None:
    """Delete temp files that a killed run left behind (their process is gone)."""
    for f in out.iterdir():
        m = _TEMP.match(f.name)
        if not m or not m["name"].endswith((".txt", ".json", ".yaml")):
            continue
        pid = int(m["pid"])
        if os.name == "posix":
            try:
                os.kill(pid, 0)  # signal 0 only checks that the process exists
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, owned by someone else
        elif time.time() - f.stat().st_mtime < 86400:
            continue  # no cheap liveness test here (os.kill would terminate it): only old files go
        f.unlink(missing_ok=True)


def _load_sam(sam_model: Any, device: str):
    from .model import SAM

    model = sam_model if isinstance(sam_model, SAM) else SAM(sam_model, device=device)
    return model.predictor


def _segment(predictor, path: str, image: np.ndarray, xyxy: np.ndarray, cls: np.ndarray,
             summary: AnnotateSummary) -> list[tuple[int, np.ndarray, np.ndarray, float, np.ndarray]]:
    """All boxes of one image in one prompt call → ``(cls, normalised polygon, mask, score, box)``
    per box that gave a usable mask, in box order. The others go to ``summary.empty_masks``."""
    h, w = image.shape[:2]
    boxes = xyxy.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    valid = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    found: dict[int, tuple] = {}
    if len(valid):
        predictor.set_image(image)
        res = predictor(bboxes=boxes[valid], multimask_output=False)[0]
        masks, scores, polys = to_numpy(res.masks.data), to_numpy(res.boxes.conf), res.masks.xyn
        for j, i in enumerate(valid):
            found[int(i)] = (polys[j], masks[j], float(scores[j]), to_numpy(res.boxes.xyxy[j]))
    objects = []
    for i, c in enumerate(cls.tolist()):
        if i not in found:
            reason = "box lies off the image or has no area"
        elif not found[i][1].any():
            reason = "empty mask"
        else:
            objects.append((c, *found[i]))
            continue
        summary.empty_masks.append(EmptyMask(path, i, c, reason))
    return objects
