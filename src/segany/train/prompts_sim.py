"""Prompts simulated from ground-truth masks, as SAM was trained and evaluated (Kirillov et al.
2023, appendix A): a box from the mask with noise, a point inside the mask, corrective clicks
from the error region of the previous prediction. Coordinates are ``x, y`` pixels of the mask.

Training draws them batched on the device (torch); validation uses the deterministic NumPy
forms (tight box, most interior point)."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight ``x1, y1, x2, y2`` box of a non-empty ``(H, W)`` mask (inclusive max, as Meta's)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``x1, y1, x2, y2`` boxes ``(P, 4)`` of non-empty masks ``(P, H, W)`` (inclusive max)."""
    def extent(any_along: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(any_along.shape[1], device=any_along.device)
        first = torch.where(any_along, idx, any_along.shape[1]).amin(1)
        last = torch.where(any_along, idx, -1).amax(1)
        return first, last

    x1, x2 = extent(masks.any(1))
    y1, y2 = extent(masks.any(2))
    return torch.stack([x1, y1, x2, y2], 1).float()


def noisy_boxes(masks: torch.Tensor, generator: torch.Generator, rel_std: float = 0.1, max_px: float = 20.0
                ) -> torch.Tensor:
    """The masks' boxes ``(P, 4)`` with noise of std ``rel_std`` × the side length, at most
    ``max_px`` per coordinate, kept inside the image and ordered."""
    box = mask_boxes(masks)
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    std = rel_std * torch.stack([w, h, w, h], 1)
    noise = torch.randn(box.shape, generator=generator, device=box.device) * std
    out = box + noise.clamp(-max_px, max_px)
    hh, ww = masks.shape[-2:]
    xs, ys = out[:, 0::2].clamp(0, ww - 1), out[:, 1::2].clamp(0, hh - 1)
    return torch.stack([xs.amin(1), ys.amin(1), xs.amax(1), ys.amax(1)], 1)


def random_points(regions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One pixel centre ``(x, y)`` per region ``(P, H, W)``, uniform over its pixels: the largest of
    independent uniform scores over the region's pixels falls on each pixel with equal chance.
    An empty region gives a point anywhere."""
    p, h, w = regions.shape
    score = torch.rand((p, h * w), generator=generator, device=regions.device) + regions.flatten(1)
    k = score.argmax(1)
    return torch.stack([k % w, k // w], 1).float() + 0.5


def corrective_points(pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A click per prompt that fixes the previous prediction ``pred`` ``(P, H, W)`` of ``gt``: at
    random in the false negatives (label 1) or the false positives (label 0), whichever is larger;
    a positive click inside ``gt`` where nothing is wrong. Returns points ``(P, 2)``, labels ``(P,)``."""
    fn, fp = gt & ~pred, pred & ~gt
    positive = fn.flatten(1).sum(1) >= fp.flatten(1).sum(1)
    region = torch.where(positive[:, None, None], fn, fp)
    perfect = ~region.flatten(1).any(1)
    region = torch.where(perfect[:, None, None], gt, region)
    labels = (positive | perfect).long()
    return random_points(region, generator), labels


def center_point(mask: np.ndarray) -> np.ndarray:
    """The point of the mask farthest from its boundary (the SAM paper's evaluation point)."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the image border counts as boundary
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x + 0.5, y + 0.5])


def corrective_point(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The evaluation's corrective click: the most interior point of the false negatives (label 1)
    or of the false positives (label 0), whichever region is larger. None when nothing is wrong."""
    fn, fp = gt & ~pred, pred & ~gt
    region, label = (fn, 1) if fn.sum() >= fp.sum() else (fp, 0)
    if not region.any():
        return None
    return center_point(region), label
