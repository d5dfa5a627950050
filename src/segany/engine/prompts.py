"""Validation and normalisation of prompts (SPEC §3) into per-object arrays.

Shapes accepted (x, y in pixels of the original image):
- ``bboxes``: ``(4,)`` one box or ``(N, 4)`` N boxes, ``x1, y1, x2, y2``.
- ``points``: ``(2,)`` one point; ``(N, 2)`` N objects with one point each; ``(N, P, 2)`` N objects
  with P points each. ``labels`` match: scalar/``(1,)``, ``(N,)``, ``(N, P)``; default 1 (positive),
  0 = negative.
- ``masks``: low-resolution logits ``(256, 256)``/``(N, 256, 256)``/``(N, 1, 256, 256)`` from an
  earlier call, or binary masks at the image size ``(H, W)``/``(N, H, W)``.

Choices for prompts off the image: a point outside the image is an error; a box that sticks out
is clipped to the image with a warning; a box entirely outside is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PromptError, warn


@dataclass
class Prompts:
    """Prompts for N objects, in original-image pixels."""

    points: np.ndarray | None = None  # (N, P, 2) float64
    labels: np.ndarray | None = None  # (N, P) int64
    boxes: np.ndarray | None = None  # (N, 4) float64
    masks: np.ndarray | None = None  # (N, h, w) float32 low-res logits, or (N, H, W) 0/1 at image size
    masks_are_logits: bool = True

    def __len__(self) -> int:
        for a in (self.boxes, self.points, self.masks):
            if a is not None:
                return len(a)
        return 0


def _as_array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        kind = np.asarray(value).dtype.kind
    except (ValueError, TypeError):
        kind = "O"  # ragged: explained below
    # Text would convert ("10" → 10.0) and so would True/False, silently: a caller's mistake. (A
    # binary mask may be bool, and labels True/False for positive/negative.)
    if kind in "USb" and not (kind == "b" and name in ("masks", "labels")):
        raise PromptError(f"{name} must be numbers, got {'text' if kind in 'US' else 'True/False values'}: "
                          f"{_short(value)}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as e:
        ragged = "inhomogeneous" in str(e) or "sequence" in str(e)
        why = ("its lists have different lengths: every object needs the same number of points (pad "
               "with another point of the object), or decode the objects in separate calls") if ragged else "not numbers"
        raise PromptError(f"{name} must be numbers in a list/array of a regular shape; {why}") from None
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{name} contains NaN or infinite values")
    if arr.size == 0:
        raise PromptError(f"{name} is empty: give at least one, or leave {name} out")
    return arr


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_prompts(
    image_size: tuple[int, int],
    bboxes=None,
    points=None,
    labels=None,
    masks=None,
    low_res_size: int = 256,
) -> Prompts:
    """Check prompts against each other and the image ``(H, W)``; raise :class:`PromptError` on misuse."""
    h, w = image_size
    out = Prompts()
    if labels is not None and points is None:
        raise PromptError("labels were given without points: pass points=[x, y] (or [[x, y], ...]) with labels")
    if bboxes is not None:
        out.boxes = _parse_boxes(_as_array(bboxes, "bboxes"), h, w)
    if points is not None:
        out.points, out.labels = _parse_points(_as_array(points, "points"), labels, h, w)
    if masks is not None:
        out.masks, out.masks_are_logits = _parse_masks(masks, h, w, low_res_size)
    counts = {k: len(v) for k, v in (("bboxes", out.boxes), ("points", out.points), ("masks", out.masks)) if v is not None}
    if len(set(counts.values())) > 1:
        # One box or one mask may go with one multi-point object, nothing else is broadcast.
        detail = ", ".join(f"{k}: {n}" for k, n in counts.items())
        raise PromptError(f"prompts describe different numbers of objects ({detail}); give one entry per object for each")
    if out.labels is not None and out.boxes is None and out.masks is None:
        lone = np.nonzero(~(out.labels == 1).any(axis=1))[0]
        if len(lone):
            # Legal (SAM segments "not here"), but mostly a layout slip: [[x, y], [x, y]] is two
            # objects of one point each, [[[x, y], [x, y]]] one object of two points.
            warn(f"object {lone[0]} of {len(out.labels)} has only negative points and nothing else to "
                 "segment; several points of one object go in one list: points=[[[x, y], [x, y]]], "
                 "labels=[[1, 0]]")
    return out


def _parse_boxes(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4 or len(arr) == 0:
        raise PromptError(f"bboxes must be [x1, y1, x2, y2] or a list of them (shape (N, 4)), got shape {arr.shape}")
    bad = np.nonzero((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1]))[0]
    if len(bad):
        raise PromptError(f"bboxes[{bad[0]}] = {arr[bad[0]].tolist()} has x2 < x1 or y2 < y1; boxes are x1, y1, x2, y2")
    clipped = arr.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, w)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, h)
    # Outside: no overlap with the image, i.e. a side that clipping shrinks to nothing (a box the
    # user gave zero width or height inside the image stays a valid, degenerate prompt).
    gone = ((clipped[:, 2] == clipped[:, 0]) & (arr[:, 2] > arr[:, 0])) | ((clipped[:, 3] == clipped[:, 1]) & (arr[:, 3] > arr[:, 1]))
    outside = np.nonzero(gone | (arr[:, 2] < 0) | (arr[:, 3] < 0) | (arr[:, 0] > w) | (arr[:, 1] > h))[0]
    if len(outside):
        raise PromptError(f"bboxes[{outside[0]}] = {arr[outside[0]].tolist()} lies outside the {w}x{h} image "
                          "(boxes are x1, y1, x2, y2 in pixels of the original image)")
    if not np.array_equal(clipped, arr):
        warn(f"bboxes extend past the {w}x{h} image; clipped to it")
    return clipped


def _parse_points(arr: np.ndarray, labels, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    if arr.ndim == 1:
        arr = arr[None, None] if arr.shape == (2,) else arr
    elif arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3 or arr.shape[-1] != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PromptError(
            f"points must be [x, y], a list of [x, y] (one per object) or a list of lists of [x, y] "
            f"(several points per object), got shape {np.shape(arr)}"
        )
    n, p = arr.shape[:2]
    if labels is None:
        lab = np.ones((n, p), dtype=np.int64)
    else:
        lab_f = _as_array(labels, "labels")
        if lab_f.size != n * p:
            raise PromptError(
                f"labels do not match points: {n} object(s) with {p} point(s) each need {n * p} label(s) "
                f"(shape ({n}, {p})), got shape {lab_f.shape}"
            )
        # Any layout that lists the labels in point order is accepted ((N, P), (N,), (1, N), ...);
        # a transposed (P, N) table is not, since it would pair labels with the wrong points.
        squeezed = tuple(d for d in lab_f.shape if d != 1)
        if squeezed not in (tuple(d for d in (n, p) if d != 1), (n * p,), ()):
            raise PromptError(f"labels must have shape ({n}, {p}) to match points, got {lab_f.shape}")
        if not np.isin(lab_f, (0, 1)).all():
            raise PromptError(f"labels must be 1 (positive) or 0 (negative), got {np.unique(lab_f).tolist()}")
        lab = lab_f.reshape(n, p).astype(np.int64)
    xs, ys = arr[..., 0], arr[..., 1]
    outside = np.argwhere((xs < 0) | (ys < 0) | (xs > w) | (ys > h))
    if len(outside):
        i, j = outside[0]
        raise PromptError(f"point {arr[i, j].tolist()} lies outside the {w}x{h} image (x in 0..{w}, y in 0..{h})")
    return arr, lab


def _parse_masks(masks, h: int, w: int, low: int) -> tuple[np.ndarray, bool]:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        masks = (masks if masks.dtype == torch.bool else masks.float()).numpy()
    if isinstance(masks, np.ndarray) and masks.dtype in (np.bool_, np.uint8):
        # A binary mask stays one byte a pixel: a float copy of a large image's masks takes GBs.
        arr = masks.view(np.uint8)  # bool → 0/1, no copy
        arr = arr[:, 0] if arr.ndim == 4 and arr.shape[1] == 1 else arr
        arr = arr[None] if arr.ndim == 2 else arr
        if arr.ndim == 3 and len(arr) and arr.shape[1:] == (h, w) and arr.max(initial=0) <= 1:
            return arr, False
    arr = _as_array(masks, "masks").astype(np.float32)  # bool → 0/1
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or len(arr) == 0:
        raise PromptError(f"masks must be (H, W) or (N, H, W) (or (N, 1, H, W)), got shape {np.shape(masks)}")
    binary = bool(np.isin(arr, (0.0, 1.0)).all())
    if arr.shape[1:] == (h, w) and binary:
        return arr, False
    if arr.shape[1:] == (low, low):
        return arr, True
    if arr.shape[1:] == (h, w):
        raise PromptError(f"a mask at the image size must be binary (0/1 or bool); pass logits at {low}x{low} instead")
    raise PromptError(
        f"masks must be low-resolution logits of shape ({low}, {low}) (results[0].low_res_logits) or binary "
        f"masks of the image size ({h}, {w}), got {arr.shape[1:]}"
    )
