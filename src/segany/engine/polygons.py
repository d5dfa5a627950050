"""Mask geometry for :mod:`segany.engine.results`: outer contours, one merged polygon per mask,
and tight boxes.

Conventions (used throughout segany's Results):

- Polygon vertices are ``(x, y)`` *pixel indices* of boundary pixels, as ``cv2.findContours``
  gives them (pixel centres sit on integer coordinates). Filling such a polygon with
  ``cv2.fillPoly`` paints the boundary pixels too, so it rasterises back to the mask.
- Boxes use the *pixel-edge* convention: ``x1 = min x``, ``x2 = max x + 1`` (same for y), so
  ``x2 - x1`` is the mask's width in pixels (COCO convention). An empty mask gets ``(0, 0, 0, 0)``.
- Only outer contours are traced (``RETR_EXTERNAL``): holes are filled in polygons, as in
  Ultralytics. Exact masks, holes included, are in ``to_coco()`` (RLE).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from .amg_utils import mask_any

# Most candidate vertices used to search for the closest points between parts. Above this the
# vertices are strided: bridges then join near-closest points instead of the exact closest
# ones, which keeps noisy masks with thousands of islands fast (memory ~ budget^2 floats).
_SEARCH_POINTS = 2048


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours of one ``(H, W)`` mask: a list of ``(K, 2)`` float32 ``(x, y)`` arrays.

    Parts are ordered largest first (by contour area; stable otherwise). Empty mask → ``[]``.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_contours expects one (H, W) mask, got shape {m.shape}")
    rows = np.flatnonzero(m.any(1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(m.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Trace only the mask's bounding box (fast for small masks in big images), padded by one
    # zero pixel so parts touching the image border still get closed contours.
    crop = np.ascontiguousarray(m[y0:y1, x0:x1] != 0, dtype=np.uint8)
    crop = cv2.copyMakeBorder(crop, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    found, _ = cv2.findContours(
        crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(int(x0) - 1, int(y0) - 1)
    )
    contours = [c.reshape(-1, 2).astype(np.float32) for c in found]
    contours.sort(key=lambda c: -cv2.contourArea(c) if len(c) > 2 else 0.0)
    return contours


def merge_contours(contours: list[np.ndarray]) -> np.ndarray:
    """Join several outer contours into ONE ``(K, 2)`` float32 polygon with zero-width bridges.

    The parts are linked by a minimum spanning tree over closest points (the idea of Ultralytics'
    ``merge_multi_segment``, but every part joins its nearest neighbour, not the next in list
    order). The walk goes around the first part and, at each link point, detours out along the
    bridge, around the linked part and back along the same bridge. Bridges enclose no area, so
    ``cv2.fillPoly`` of the result recovers every part (plus at most the 1-pixel bridge lines).
    No contours → ``(0, 2)``.
    """
    contours = [np.asarray(c, dtype=np.float32).reshape(-1, 2) for c in contours]
    contours = [c for c in contours if len(c)]
    if not contours:
        return np.zeros((0, 2), np.float32)
    if len(contours) == 1:
        return contours[0].copy()
    children = _spanning_links(contours)
    poly = _walk(contours, children)
    # Drop repeated consecutive vertices (single-pixel parts, bridge ends) and the closing vertex.
    keep = np.ones(len(poly), bool)
    keep[1:] = np.any(poly[1:] != poly[:-1], axis=1)
    poly = poly[keep]
    if len(poly) > 1 and np.array_equal(poly[0], poly[-1]):
        poly = poly[:-1]
    return np.ascontiguousarray(poly, dtype=np.float32)


def mask_to_polygon(mask: np.ndarray) -> np.ndarray:
    """One ``(H, W)`` mask → one merged ``(K, 2)`` float32 polygon (``(0, 2)`` when empty)."""
    return merge_contours(mask_contours(mask))


def _spanning_links(contours: list[np.ndarray]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Prim's algorithm over the parts. Returns ``{(parent, vertex): [(child, entry vertex)]}``."""
    k = len(contours)
    total = sum(len(c) for c in contours)
    step = max(1, math.ceil(total / _SEARCH_POINTS))
    # Candidate vertices: every step-th vertex of each part (vertex 0 always, so no part is lost).
    local = [np.arange(0, len(c), step) for c in contours]
    owner = np.concatenate([np.full(len(ix), ci) for ci, ix in enumerate(local)])
    local_ix = np.concatenate(local)
    pts = np.concatenate([c[ix] for c, ix in zip(contours, local)])
    px, py = pts[:, 0], pts[:, 1]

    in_tree = np.zeros(k, bool)
    best = np.full(len(pts), np.inf, np.float32)  # squared distance of each vertex to the tree
    best_src = np.zeros(len(pts), np.int64)  # nearest tree vertex (candidate index)
    children: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(ci: int) -> None:
        in_tree[ci] = True
        new = np.flatnonzero(owner == ci)
        d = (px[:, None] - px[new][None]) ** 2 + (py[:, None] - py[new][None]) ** 2
        j = d.argmin(1)
        dmin = d[np.arange(len(pts)), j]
        better = dmin < best
        best[better] = dmin[better]
        best_src[better] = new[j[better]]

    add(0)
    for _ in range(k - 1):
        p = int(np.argmin(np.where(in_tree[owner], np.inf, best)))
        src = int(best_src[p])
        parent, child = int(owner[src]), int(owner[p])
        children.setdefault((parent, int(local_ix[src])), []).append((child, int(local_ix[p])))
        add(child)
    return children


def _walk(contours: list[np.ndarray], children: dict[tuple[int, int], list[tuple[int, int]]]) -> np.ndarray:
    """Emit the bridged tour of the spanning tree, iteratively (no recursion limit)."""
    out: list[np.ndarray] = []
    # Frame: [part, entry vertex, steps taken, pending children at this vertex or None].
    stack: list[list] = [[0, 0, 0, None]]
    while stack:
        frame = stack[-1]
        ci, entry, j, pending = frame
        n = len(contours[ci])
        if pending is None:
            if j > n:  # walked the whole loop and back to the entry vertex
                stack.pop()
                if stack:  # come back along the bridge to the parent's link vertex
                    pc, pe, pj, _ = stack[-1]
                    out.append(contours[pc][(pe + pj) % len(contours[pc])])
                continue
            idx = (entry + j) % n
            out.append(contours[ci][idx])
            # Detours only on the first visit of a vertex (j == n is the closing revisit).
            frame[3] = list(children.get((ci, idx), ())) if j < n else []
            continue
        if pending:
            child, child_entry = pending.pop(0)
            stack.append([child, child_entry, 0, None])
            continue
        frame[2] += 1
        frame[3] = None
    return np.stack(out)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of ``(N, H, W)`` bool masks → ``(N, 4)`` float32 ``x1, y1, x2, y2``.

    Pixel-edge convention: ``x2 = max x + 1``, ``y2 = max y + 1``. Empty masks → zeros.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows, cols = mask_any(masks, 2), mask_any(masks, 1)  # (N, H), (N, W)

    def edges(v: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ar = torch.arange(length, device=v.device)
        lo = torch.where(v, ar, length).amin(1)
        hi = torch.where(v, ar, -1).amax(1) + 1
        return lo, hi

    x1, x2 = edges(cols, w)
    y1, y2 = edges(rows, h)
    boxes = torch.stack([x1, y1, x2, y2], 1).to(torch.float32)
    boxes[~rows.any(1)] = 0.0
    return boxes
