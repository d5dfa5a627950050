"""Prompts simulated from ground-truth masks, as SAM was trained and evaluated (Kirillov et al.
2023, appendix A): a box from the mask with noise, a point inside the mask, corrective clicks
from the error region of the previous prediction. Coordinates are ``x, y`` pixels of the mask."""

from __future__ import annotations

import cv2
import numpy as np


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight ``x1, y1, x2, y2`` box of a non-empty ``(H, W)`` mask (inclusive max, as Meta's)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)


def noisy_box(mask: np.ndarray, rng: np.random.Generator, rel_std: float = 0.1, max_px: float = 20.0) -> np.ndarray:
    """The mask's box with noise of std ``rel_std`` × the side length, at most ``max_px`` per coordinate."""
    box = mask_box(mask)
    w, h = box[2] - box[0], box[3] - box[1]
    std = rel_std * np.array([w, h, w, h])
    noise = np.clip(rng.normal(0, 1, 4) * std, -max_px, max_px)
    out = box + noise
    hh, ww = mask.shape
    out[[0, 2]] = np.clip(out[[0, 2]], 0, ww - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, hh - 1)
    return np.array([min(out[0], out[2]), min(out[1], out[3]), max(out[0], out[2]), max(out[1], out[3])])


def random_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A point drawn uniformly from the mask's pixels (pixel centres)."""
    ys, xs = np.nonzero(mask)
    k = rng.integers(len(xs))
    return np.array([xs[k] + 0.5, ys[k] + 0.5])


def center_point(mask: np.ndarray) -> np.ndarray:
    """The point of the mask farthest from its boundary (the SAM paper's evaluation point)."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the image border counts as boundary
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x + 0.5, y + 0.5])


def corrective_point(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator | None = None
                     ) -> tuple[np.ndarray, int] | None:
    """A click that fixes the previous prediction: from the false negatives (label 1) or false
    positives (label 0), whichever region is larger. Random inside the region with ``rng``,
    else its most interior point (deterministic, for evaluation). None when nothing is wrong."""
    fn, fp = gt & ~pred, pred & ~gt
    region, label = (fn, 1) if fn.sum() >= fp.sum() else (fp, 0)
    if not region.any():
        return None
    point = random_point(region, rng) if rng is not None else center_point(region)
    return point, label
