"""Building blocks of segment-everything (the automatic mask generator).

Numerically these match Meta's ``segment_anything.utils.amg`` and ``torchvision.ops`` NMS; the
differences are deliberate and documented per function: crop boxes are always Python ints,
``box_xyxy_to_xywh`` gives the true COCO width of an inclusive box (Meta's AMG ``bbox`` is one
pixel short), and NMS is pure torch so segany needs no torchvision.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "area_from_rle",
    "batched_mask_to_box",
    "batched_nms",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle_torch",
    "nms",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]


# ----------------------------------------------------------------------------- point grids
def build_point_grid(n_per_side: int) -> np.ndarray:
    """``(n*n, 2)`` float64 ``(x, y)`` cell centres of an ``n x n`` grid over ``[0, 1]^2``, x fastest."""
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer ``0..n_layers``; layer ``i`` has ``int(n / scale**i)`` points a side."""
    grids = []
    for i in range(n_layers + 1):
        n_points = int(n_per_side / (scale_per_layer**i))  # Meta's exact (float) formula
        if n_points < 1:
            raise ValueError(
                f"crop layer {i} would get {n_per_side}/{scale_per_layer}**{i} < 1 points per side; "
                "lower crop_n_points_downscale_factor or crop_n_layers"
            )
        grids.append(build_point_grid(n_points))
    return grids


# ----------------------------------------------------------------------------- crops
def generate_crop_boxes(
    im_size: Sequence[int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY, exclusive max, Python ints) and their layer index.

    Layer 0 is the whole image; layer ``i >= 1`` has ``(2**i)**2`` overlapping crops, ordered
    column by column (x outer, y inner) as Meta does. ``im_size`` is ``(h, w)``.
    """
    im_h, im_w = int(im_size[0]), int(im_size[1])  # numpy/torch ints would leak into the output
    short_side = min(im_h, im_w)
    crop_boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layer_idxs: list[int] = [0]

    for i_layer in range(n_layers):
        n_crops = 2 ** (i_layer + 1)
        # Same float expression as Meta so the truncation lands on the same integer.
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        # Integer ceil-division: equal to Meta's math.ceil(float) for any realistic size.
        crop_w = -(-(overlap * (n_crops - 1) + im_w) // n_crops)
        crop_h = -(-(overlap * (n_crops - 1) + im_h) // n_crops)
        xs0 = [(crop_w - overlap) * i for i in range(n_crops)]
        ys0 = [(crop_h - overlap) * i for i in range(n_crops)]
        for x0 in xs0:
            for y0 in ys0:
                crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
                layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ``(..., 4)`` XYXY boxes from crop to image coordinates (keeps ``boxes.dtype``)."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    offset = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype, device=boxes.device)
    return boxes + offset


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ``(..., 2)`` XY points from crop to image coordinates (keeps ``points.dtype``)."""
    offset = torch.tensor([int(crop_box[0]), int(crop_box[1])], dtype=points.dtype, device=points.device)
    return points + offset


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Zero-pad ``(..., h_crop, w_crop)`` masks to ``(..., orig_h, orig_w)`` at the crop's place."""
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return F.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """``(N,)`` bool: box (``(N, 4)``, crop coords) within ``atol`` of a crop edge that is not
    an image edge (such masks are probably cut off by the crop)."""
    crop_t = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_t = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop_t[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig_t[None, :], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


# ----------------------------------------------------------------------------- scores and boxes
def _count(masks: torch.Tensor, row_dtype: torch.dtype) -> torch.Tensor:
    """``(N, H, W)`` bool -> ``(N,)`` int32 pixel counts, never widening to int64."""
    return masks.sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int32)


def calculate_stability_score(
    mask_logits: torch.Tensor, mask_threshold: float, threshold_offset: float, chunk_size: int = 64
) -> torch.Tensor:
    """``(...,)`` float32 IoU of the masks thresholded at ``t + offset`` and ``t - offset``.

    ``mask_logits`` is ``(..., H, W)``. The high mask lies inside the low one, so IoU is a ratio
    of pixel counts. Counting runs in chunks of ``chunk_size`` masks with narrow integer sums
    (int16 along a row, int32 over rows), so at most ``chunk_size*H*W`` bytes of booleans exist
    at once instead of Meta's two full-size copies. An all-background low mask gives NaN (0/0),
    exactly like Meta (and NaN never passes a threshold).
    """
    h, w = mask_logits.shape[-2:]
    lead = mask_logits.shape[:-2]
    flat = mask_logits.reshape(-1, h, w)
    # int16 row sums overflow past 32767 columns; widen only then.
    row_dtype = torch.int16 if w <= torch.iinfo(torch.int16).max else torch.int32
    hi_t, lo_t = mask_threshold + threshold_offset, mask_threshold - threshold_offset
    inter = torch.empty(flat.shape[0], dtype=torch.int32, device=flat.device)
    union = torch.empty_like(inter)
    for s in range(0, flat.shape[0], chunk_size):
        chunk = flat[s : s + chunk_size]
        inter[s : s + chunk_size] = _count(chunk > hi_t, row_dtype)
        union[s : s + chunk_size] = _count(chunk > lo_t, row_dtype)
    return (inter / union).reshape(lead)


def mask_any(masks: torch.Tensor, dim: int) -> torch.Tensor:
    """``masks.any(dim)`` for bool masks, as a max over their bytes: PyTorch's CPU ``any`` over
    bool runs element by element (~50× slower on a batch of full-size masks)."""
    return masks.view(torch.uint8).amax(dim) > 0


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` bool masks -> ``(..., 4)`` int64 XYXY with *inclusive* max; empty -> 0,0,0,0.

    Meta's convention: a single pixel at (x, y) gives ``[x, y, x, y]``. (Meta returns float zeros
    when the input has no elements; this always returns int64.)
    """
    *lead, h, w = masks.shape
    if masks.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.int64, device=masks.device)
    masks = masks.reshape(-1, h, w).bool()
    rows = mask_any(masks, -1)  # (N, H): row has a pixel
    cols = mask_any(masks, -2)  # (N, W)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    bottom = torch.where(rows, ys, -1).amax(-1)
    top = torch.where(rows, ys, h).amin(-1)
    right = torch.where(cols, xs, -1).amax(-1)
    left = torch.where(cols, xs, w).amin(-1)
    out = torch.stack([left, top, right, bottom], dim=-1)
    out = out * rows.any(-1, keepdim=True)  # empty masks -> zeros
    return out.reshape(*lead, 4)


def box_xyxy_to_xywh(
    boxes: torch.Tensor, inclusive: bool = True, empty: torch.Tensor | None = None
) -> torch.Tensor:
    """``(..., 4)`` XYXY -> XYWH (COCO ``bbox``).

    ``inclusive=True`` (boxes from :func:`batched_mask_to_box`): ``w = x2 - x1 + 1``, the real
    pixel width that pycocotools' ``toBbox`` reports. Meta's AMG uses ``x2 - x1`` here, which is
    one pixel short. ``inclusive=False`` for exclusive boxes such as crop boxes. Rows where
    ``empty`` (``(...,)`` bool, e.g. ``area == 0``) is set become ``[0, 0, 0, 0]``, since an
    empty mask's ``[0, 0, 0, 0]`` box is indistinguishable from the single pixel (0, 0).
    """
    boxes = torch.as_tensor(boxes)
    extra = 1 if inclusive else 0
    wh = boxes[..., 2:] - boxes[..., :2] + extra
    out = torch.cat([boxes[..., :2], wh], dim=-1)
    if empty is not None:
        out = out.masked_fill(torch.as_tensor(empty, device=out.device)[..., None], 0)
    return out


# ----------------------------------------------------------------------------- RLE
def mask_to_rle_torch(masks: torch.Tensor) -> list[dict[str, Any]]:
    """``(N, H, W)`` bool -> N uncompressed COCO RLEs ``{"size": [H, W], "counts": [...]}``.

    Column-major (Fortran) order as COCO; counts start with a run of zeros (possibly 0). All
    the work is vectorised on ``masks.device``; only the final run lengths are copied back.
    Equal to Meta's ``mask_to_rle_pytorch``, without its per-mask scan of all change points.
    """
    n, h, w = masks.shape
    length = h * w
    if n == 0:
        return []
    if length == 0:
        return [{"size": [h, w], "counts": [0]} for _ in range(n)]
    # All masks back to back in column-major order: one diff and one nonzero for the batch.
    flat = masks.bool().transpose(1, 2).reshape(-1)
    change = flat[1:] ^ flat[:-1]
    change[length - 1 :: length] = True  # force a run break where one mask ends and the next starts
    starts = torch.nonzero(change, as_tuple=True)[0] + 1
    ends = torch.tensor([n * length], dtype=starts.dtype, device=starts.device)
    bounds = torch.cat([torch.zeros_like(ends), starts, ends])
    runs = bounds.diff()
    n_runs = torch.bincount(torch.div(bounds[:-1], length, rounding_mode="floor"), minlength=n)
    runs_l, n_runs_l, first_l = runs.tolist(), n_runs.tolist(), flat[::length].tolist()
    out, start = [], 0
    for i in range(n):
        counts = runs_l[start : start + n_runs_l[i]]
        start += n_runs_l[i]
        if first_l[i]:
            counts.insert(0, 0)  # COCO counts always begin with a (here empty) run of zeros
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> ``(H, W)`` bool array (C-contiguous; Meta returns a transposed view)."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h}*{w}={h * w}")
    values = (np.arange(len(counts)) % 2).astype(bool)  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixel count of an uncompressed RLE (sum of the odd runs)."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed RLE -> compressed COCO RLE with ``counts`` as str (JSON-serialisable)."""
    from pycocotools import mask as mask_utils  # lazy: only needed for coco_rle output

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# ----------------------------------------------------------------------------- post-processing
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh``.

    ``mask`` is ``(H, W)`` bool; returns ``(mask, changed)``. 8-connectivity; if every island is
    small, the largest is kept. Same result as Meta's; an unchanged mask is returned as is.
    """
    import cv2  # lazy: heavy import, only for min_mask_region_area > 0

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = np.ascontiguousarray(correct_holes ^ mask.astype(bool, copy=False), dtype=np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background of `working`
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    # Lookup table over labels instead of np.isin: one gather per pixel.
    fill = np.zeros(n_labels, dtype=bool)
    if correct_holes:
        fill[0] = True  # the original foreground
        fill[small] = True
    else:
        fill[1:] = True
        fill[small] = False
        if not fill.any():
            fill[int(np.argmax(sizes)) + 1] = True
    return fill[regions], True


# ----------------------------------------------------------------------------- NMS
_NMS_ROWS = 512  # IoU rows computed at once: bounds memory, and the granularity of skipping


def _strict_threshold(thr: float, dtype: torch.dtype) -> float:
    """Largest ``dtype`` value ``t <= thr``: then ``iou > thr`` (in double, as torchvision's
    kernel compares) equals ``iou > t`` computed in ``dtype``."""
    if dtype == torch.float64:
        return float(thr)
    t = torch.tensor(thr, dtype=dtype)
    if float(t) > thr:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return float(t)


def _iou(b1: torch.Tensor, b2: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """``(R, M)`` IoU of XYXY boxes ``(R, 4)`` x ``(M, 4)`` with areas ``(R,)``, ``(M,)``.

    Same float operations, in the same order, as torchvision's CPU kernel (bitwise equal IoU).
    """
    iw = torch.minimum(b1[:, None, 2], b2[None, :, 2]) - torch.maximum(b1[:, None, 0], b2[None, :, 0])
    ih = torch.minimum(b1[:, None, 3], b2[None, :, 3]) - torch.maximum(b1[:, None, 1], b2[None, :, 1])
    inter = iw.clamp_(min=0) * ih.clamp_(min=0)
    return inter / (a1[:, None] + a2[None, :] - inter)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Greedy per-category NMS; int64 kept indices by decreasing score (ties: lower index first).

    ``boxes`` ``(N, 4)`` XYXY, ``scores`` ``(N,)``, ``idxs`` ``(N,)`` categories. A box is
    dropped when its IoU with a kept, higher-ranked box of the same category is ``> iou_threshold``.
    Same indices and order as ``torchvision.ops.batched_nms``; IoU uses exclusive areas
    ``(x2-x1)*(y2-y1)`` and the same float operations as torchvision's kernel. (Past 1000 boxes
    torchvision re-sorts with an unstable sort, so equal scores may come out in another order
    there; the kept set is the same.)
    """
    device = boxes.device
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if not boxes.is_floating_point() or boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    cat = idxs.to(device)[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    thr = _strict_threshold(iou_threshold, b.dtype)
    multi = bool((cat != cat[0]).any())  # single category: skip the category test
    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    # Blocks of ranks [s, e): only rows still alive when the block is reached get an IoU row, and
    # only against ranks >= s (the upper triangle), so heavy suppression is cheap.
    for s in range(0, n, _NMS_ROWS):
        e = min(s + _NMS_ROWS, n)
        rows_np = np.flatnonzero(~removed[s:e]) + s
        if rows_np.size == 0:
            continue
        rows = torch.from_numpy(rows_np).to(device)
        sup = _iou(b[rows], b[s:], area[rows], area[s:]) > thr  # (r, n - s)
        if multi:
            sup &= cat[rows, None] == cat[None, s:]
        sup_np = sup.cpu().numpy()
        kept_local = []
        for li, i in enumerate(rows_np.tolist()):  # greedy inside the block
            if removed[i]:
                continue
            keep.append(i)
            kept_local.append(li)
            removed[i + 1 : e] |= sup_np[li, i + 1 - s : e - s]
        if e < n:
            removed[e:] |= sup_np[kept_local, e - s :].any(axis=0)
    return order[torch.as_tensor(keep, dtype=torch.int64, device=device)]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Single-category :func:`batched_nms` (same as ``torchvision.ops.nms``)."""
    idxs = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    return batched_nms(boxes, scores, idxs, iou_threshold)
