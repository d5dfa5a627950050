"""What ``auto_annotate`` writes besides the YOLO label files: the COCO ``annotations.json``
(read back on a rerun, image ids kept from a COCO box source, one annotation per object) and the
``classes.txt`` / ``data.yaml`` a YOLO trainer reads. Every file is written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import __version__
from .engine.export import atomic_write_text, encode_rle
from .errors import ConfigError, warn


def read_coco(file: Path) -> dict[str, Any]:
    """The COCO output of an earlier run, to add to: it is written whole, so the images it lists
    are the done ones. ``last_ann``: its highest annotation id (new ones are numbered after it)."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        images, annotations = list(doc["images"]), list(doc["annotations"])
        if not all(isinstance(e["file_name"], str) and int(e["id"]) >= 0 for e in images):
            raise ValueError("an image without a file_name or an id")
        last = max((int(a["id"]) for a in annotations), default=0)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{file} is not an annotations file of auto_annotate ({e}): a rerun adds the missing "
                          "images to it; move it away, or pass overwrite=True to start over") from None
    return {"images": images, "annotations": annotations, "last_ann": last}


def coco_image_ids(paths: list[str], known: dict[str, int], done: dict[str, int], used: set[int]) -> dict[str, int]:
    """COCO image ids: those already in the output (``done``; ``used``: all ids there), else a box
    source's own (a COCO JSON's), the other images numbered after them; no id twice."""
    ids, used = dict(done), set(used)
    for p, i in known.items():
        if p not in ids and i not in used:
            ids[p] = i
            used.add(i)
    n = max([*known.values(), *used], default=0)
    for p in paths:
        if p not in ids:
            n += 1
            ids[p] = n
    return ids


def add_coco(coco: dict, image_id: int, name: str, shape: tuple[int, int],
              objects: list, category_ids: dict[int, int] | None) -> None:
    """Add one image and its objects ``(class, polygon, mask, score, box)`` to ``coco``, classes as
    the box source's category ids (``category_ids``) where it has them."""
    coco["images"].append({"id": image_id, "file_name": name, "height": int(shape[0]), "width": int(shape[1])})
    for c, _, mask, score, box in objects:
        x1, y1, x2, y2 = (float(v) for v in box)
        coco["last_ann"] += 1
        coco["annotations"].append({
            "id": coco["last_ann"],
            "image_id": image_id,
            "category_id": category_ids.get(c, c) if category_ids else c,
            "segmentation": encode_rle(mask),
            "area": int(mask.sum()),
            "bbox": [x1, y1, x2 - x1, y2 - y1],  # of the mask, pixel edges (as Results.to_coco)
            "iscrowd": 0,
            "score": score,
        })


def write_coco(file: Path, coco: dict, names: dict[int, str], category_ids: dict[int, int] | None) -> None:
    """Write ``coco`` (images and annotations so far) as a whole COCO file, with its categories."""
    cats = [{"id": category_ids.get(k, k) if category_ids else k, "name": n} for k, n in sorted(names.items())]
    doc = {"info": {"description": "segany auto_annotate", "version": __version__}, "licenses": [],
           "images": coco["images"], "annotations": coco["annotations"], "categories": cats}
    atomic_write_text(file, json.dumps(doc))


def write_class_names(out: Path, names: dict[int, str], clash: bool) -> None:
    """``classes.txt`` (one name per line, by id) and a minimal ``data.yaml`` for YOLO trainers."""
    n = max(names, default=-1) + 1
    full = [names.get(i, str(i)) for i in range(n)]
    # json.dumps gives double-quoted strings, which YAML reads as the same strings.
    yaml = ("# written by segany auto_annotate: add train/val image paths to train on it\n"
            f"nc: {n}\nnames:\n" + "".join(f"  {i}: {json.dumps(s)}\n" for i, s in enumerate(full)))
    files = {"data.yaml": yaml, "classes.txt": "".join(s + "\n" for s in full)}
    if clash:
        warn("an image is named 'classes': classes.txt is not written (it is that image's label file)")
        del files["classes.txt"]
    for name, text in files.items():
        f = out / name
        if not (f.is_file() and f.read_text(encoding="utf-8") == text):  # a rerun leaves it untouched
            atomic_write_text(f, text)
