"""Writing :class:`~segany.engine.results.Results` out: atomic file writes, YOLO-seg label lines,
Ultralytics-style summaries and COCO RLE annotations."""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    from .results import Results

# SA-1B record fields carried into to_coco() when segment-everything produced them.
RECORD_FIELDS = ("predicted_iou", "stability_score", "point_coords", "crop_box")


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, example_name: str) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` all at once when the block ends: a temporary file in the
    same folder, flushed and fsynced, then ``os.replace``d over the target. Readers never see a
    half-written file and a failure leaves no temporary file behind. Parent folders are created.
    ``example_name``: the file name the error for a folder suggests."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name to write to (e.g. {path / example_name})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600, so the result has the
    # permissions a plain open() would give.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, example_name: str = "result.jpg") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`_atomic_file`). Returns the path."""
    with _atomic_file(path, example_name) as f:
        f.write(data)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike, example_name: str = "model.pt") -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`_atomic_file`), streamed to the file:
    no second copy of a large checkpoint in memory. Returns the path."""
    with _atomic_file(path, example_name) as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, example_name: str = "result.txt") -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), example_name)


def to_numpy(x: Any) -> Any:
    """Tensor → numpy array (detached, on the CPU); anything else unchanged."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def yolo_line(cls: int, poly: np.ndarray, conf: float | None = None) -> str | None:
    """One YOLO-seg label line ``cls x1 y1 x2 y2 ... [conf]`` for a normalised ``(K, 2)`` polygon
    (6 decimals); ``None`` for an empty one. A thin mask's polygon (a straight 1-pixel line has 2
    vertices, a single pixel 1) is closed back on itself to the 3 vertices a YOLO polygon needs:
    it still fills to the same pixels."""
    if len(poly) == 0:
        return None
    if len(poly) < 3:
        poly = np.resize(poly, (3, 2))  # [a, b] → [a, b, a]; [a] → [a, a, a]
    fields = [str(int(cls))] + [f"{v:.6f}" for v in np.asarray(poly).reshape(-1)]
    if conf is not None:
        fields.append(f"{float(conf):.6f}")
    return " ".join(fields)


def yolo_lines(results: Results, save_conf: bool = False) -> list[str]:
    """YOLO-seg label lines of every non-empty mask (see :func:`yolo_line`)."""
    cls = to_numpy(results.boxes.cls)
    conf = to_numpy(results.boxes.conf)
    lines = (yolo_line(cls[i], poly, conf[i] if save_conf else None) for i, poly in enumerate(results.masks.xyn))
    return [line for line in lines if line is not None]


def summary(results: Results, normalize: bool = False, decimals: int = 5) -> list[dict[str, Any]]:
    """One dict per mask, with Ultralytics' keys: ``name``, ``class``, ``confidence``,
    ``box`` (``x1 y1 x2 y2``) and ``segments`` (``x`` and ``y`` lists of the merged polygon).
    ``normalize=True`` divides by the image width/height."""
    h, w = results.orig_shape if normalize else (1, 1)
    xyxy = to_numpy(results.boxes.xyxy).astype(np.float64)
    conf = to_numpy(results.boxes.conf)
    cls = to_numpy(results.boxes.cls)
    out = []
    for i, poly in enumerate(results.masks.xy):
        c = int(cls[i])
        x1, y1, x2, y2 = xyxy[i].tolist()
        out.append(
            {
                "name": results.name_of(c),
                "class": c,
                "confidence": _finite(round(float(conf[i]), decimals)),
                "box": {
                    "x1": round(x1 / w, decimals),
                    "y1": round(y1 / h, decimals),
                    "x2": round(x2 / w, decimals),
                    "y2": round(y2 / h, decimals),
                },
                "segments": {
                    "x": (poly[:, 0].astype(np.float64) / w).round(decimals).tolist(),
                    "y": (poly[:, 1].astype(np.float64) / h).round(decimals).tolist(),
                },
            }
        )
    return out


def to_json(results: Results, normalize: bool = False, decimals: int = 5) -> str:
    """:func:`summary` as an indented JSON string."""
    return json.dumps(summary(results, normalize=normalize, decimals=decimals), indent=2, allow_nan=False)


def _finite(x: float) -> float | None:
    """``x``, or None for NaN and ±inf, which JSON cannot hold (a score from a model gone wrong)."""
    return x if math.isfinite(x) else None


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """``(H, W)`` bool mask → COCO RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def to_coco(
    results: Results, image_id: int = 0, category_id: int | None = None, start_id: int = 1
) -> list[dict[str, Any]]:
    """COCO annotations, one per mask, in mask order (empty masks included, with area 0).

    ``bbox`` is ``[x, y, w, h]`` with ``w = x2 - x1`` in pixel-edge coordinates (the true width;
    Meta's AMG reports one pixel less). ``category_id`` overrides the class of every mask;
    ``id`` is ``start_id + i`` (pass a running counter when building a multi-image file). SA-1B
    fields of segment-everything records (``predicted_iou``, ``stability_score``,
    ``point_coords``, ``crop_box``) are copied in when present.
    """
    masks = to_numpy(results.masks.data)
    xyxy = to_numpy(results.boxes.xyxy).astype(np.float64)
    conf = to_numpy(results.boxes.conf)
    cls = to_numpy(results.boxes.cls)
    records = results.records
    anns = []
    for i in range(len(masks)):
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        ann: dict[str, Any] = {
            "id": start_id + i,
            # numpy integers (an id taken from an array) are not JSON; other ids (a file-name string
            # some datasets use) stay as given, not cast or refused by int()
            "image_id": jsonable(image_id),
            "category_id": int(cls[i]) if category_id is None else jsonable(category_id),
            "segmentation": encode_rle(masks[i]),
            "area": int(masks[i].sum()),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "iscrowd": 0,
            "score": _finite(float(conf[i])),
        }
        if records is not None:
            for key in RECORD_FIELDS:
                if key in records[i]:
                    value = jsonable(records[i][key])
                    ann[key] = _finite(value) if isinstance(value, float) else value
            if "crop_box" in ann:  # pixel offsets: always ints (Meta's records drift to floats)
                ann["crop_box"] = [int(round(v)) for v in ann["crop_box"]]
        anns.append(ann)
    return anns


def jsonable(x: Any) -> Any:
    """Tensors, numpy arrays and numpy scalars → plain Python lists/numbers (recursively)."""
    x = to_numpy(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    return x
