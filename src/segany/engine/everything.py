"""Segment everything (automatic mask generation, SPEC §5): Meta's ``SamAutomaticMaskGenerator``.

The algorithm and its numerics are Meta's: a grid of single-point prompts per crop (layer 0 is
the whole image, layer ``i`` has ``4**i`` overlapping crops cut from the full-resolution
original), three masks per point, predicted-IoU and stability filters (a threshold ``<= 0``
turns a filter off), removal of crop masks touching an inner crop edge, box NMS within each
crop and across crops (smaller crops preferred), then optional hole/island clean-up with a
last NMS that prefers untouched masks. Memory is bounded by the batch size: masks are kept as
run-length codes from the moment they are thresholded (see :mod:`.everything_ops`).

Documented choices:

- The score filter is ``conf_thres`` (Meta's ``pred_iou_thresh``). ``conf`` (Ultralytics'
  score option, never applied to prompted outputs) is off by default; when set, a mask needs a
  predicted IoU above both, in the same place of the algorithm (so Meta's parameters alone still
  give Meta's masks).
- ``multimask_output`` does not apply: every point gives Meta's three masks.
- ``point_grids`` wins over ``points_stride`` when both are set (``points_stride`` has a default).
- Crops of zero width or height (tiny images with crop layers) are skipped; Meta fails on them.
- ``Results.cls`` is the mask index ``0..N-1`` (as prompted calls number their prompts);
  ``low_res_logits`` is ``None`` (crop masks have no logits in the image frame).
- Every model family runs this (SAM 1) algorithm, SAM 2 included: it equals sam2's
  ``SAM2AutomaticMaskGenerator`` at ``multimask_output=True`` and ``min_mask_region_area=0``
  (masks upsampled as the model does: SAM 2 straight from low-res to the image), with or
  without its mask-to-mask refinement (``use_m2m``, any family). Not implemented: single-mask
  output; SAM 2's own defaults (``pred_iou_thresh`` 0.8, not 0.88); and its ``min_mask_region_area``, which fills
  holes and removes sprinkles in the low-res logits with a CUDA kernel (skipped where that is
  missing) instead of the hole/island clean-up and NMS done here. Records' ``point_coords`` are
  float64 as in Meta's SAM 1 generator (sam2's are float32).
- Records' ``bbox`` is COCO's true width ``x2 - x1 + 1`` (Meta's is one pixel short), and
  ``[0, 0, 0, 0]`` for an empty mask; ``segmentation`` is a compressed COCO RLE (str counts).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import META_ALIASES
from ..errors import ConfigError
from .amg_utils import (batched_mask_to_box, batched_nms, box_xyxy_to_xywh, build_all_layer_point_grids,
                        generate_crop_boxes, remove_small_regions)
from .device import autocast
from .everything_ops import MaskSet, Upsampler, counts_to_masks, encode_counts, mask_to_counts, process_batch
from .results import Results
from .transforms import scale_coords

_ALIAS_OF = {v: k for k, v in META_ALIASES.items()}


@dataclass(frozen=True)
class EverythingOptions:
    """Validated segment-everything parameters (segany names; Meta's in brackets in the errors)."""

    point_grids: list[np.ndarray]  # one (n, 2) grid in [0, 1]^2 per crop layer
    points_batch_size: int
    crop_n_layers: int
    crop_overlap_ratio: float
    conf_thres: float
    stability_score_thresh: float
    stability_score_offset: float
    iou: float
    crop_nms_thresh: float
    min_mask_region_area: float
    use_m2m: bool


def _name(key: str) -> str:
    return f"{key} ({_ALIAS_OF[key]})" if key in _ALIAS_OF else key


def _int(opts: dict[str, Any], key: str, lo: int) -> int:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ConfigError(f"{_name(key)} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _bool(opts: dict[str, Any], key: str) -> bool:
    v = opts[key]
    if not isinstance(v, (bool, np.bool_)):
        raise ConfigError(f"{key} must be true or false, got {v!r}")
    return bool(v)


def _real(opts: dict[str, Any], key: str, lo: float, hi: float, hi_open: bool = False) -> float:
    v = opts[key]
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (lo <= v and (v < hi if hi_open else v <= hi)):
        raise ConfigError(f"{_name(key)} must be a number in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
    return float(v)


def check_everything_options(opts: dict[str, Any]) -> EverythingOptions:
    """Validate the segment-everything options; a bad value is a ConfigError naming it."""
    n_layers = _int(opts, "crop_n_layers", 0)
    grids = opts["point_grids"]
    if grids is not None:
        grids = _check_grids(grids, n_layers)
    else:
        if opts["points_stride"] is None:
            raise ConfigError("points_stride (points_per_side) or point_grids must be given")
        stride = _int(opts, "points_stride", 1)
        factor = _int(opts, "crop_downscale_factor", 1)
        try:
            grids = build_all_layer_point_grids(stride, n_layers, factor)
        except ValueError as e:
            raise ConfigError(f"crop_downscale_factor (crop_n_points_downscale_factor): {e}") from None
    return EverythingOptions(
        point_grids=grids,
        points_batch_size=_int(opts, "points_batch_size", 1),
        crop_n_layers=n_layers,
        crop_overlap_ratio=_real(opts, "crop_overlap_ratio", 0.0, 1.0, hi_open=True),
        # Thresholds <= 0 turn a filter off (Meta), so any value up to 1 is meaningful.
        conf_thres=max(_real(opts, "conf_thres", -math.inf, 1.0),
                       -math.inf if opts.get("conf") is None else _real(opts, "conf", 0.0, 1.0)),
        stability_score_thresh=_real(opts, "stability_score_thresh", -math.inf, 1.0),
        stability_score_offset=_real(opts, "stability_score_offset", 0.0, math.inf),
        iou=_real(opts, "iou", 0.0, 1.0),
        crop_nms_thresh=_real(opts, "crop_nms_thresh", 0.0, 1.0),
        min_mask_region_area=_real(opts, "min_mask_region_area", 0.0, math.inf),
        use_m2m=_bool(opts, "use_m2m"),
    )


def _check_grids(grids: Any, n_layers: int) -> list[np.ndarray]:
    try:
        if np.asarray(grids, dtype=np.float64).ndim == 2:  # one (n, 2) grid, an array or a nested list
            grids = [grids]
    except (TypeError, ValueError):
        pass  # grids of different sizes: checked one by one below
    try:
        out = [np.asarray(g, dtype=np.float64) for g in grids]
    except (TypeError, ValueError):
        raise ConfigError("point_grids must be a list of (n, 2) arrays of x, y in [0, 1], one per crop layer") from None
    for i, g in enumerate(out):
        if g.ndim != 2 or g.shape[1] != 2:
            raise ConfigError(f"point_grids[{i}] must be an (n, 2) array of x, y in [0, 1], got shape {g.shape}")
        if not np.isfinite(g).all() or ((g < 0) | (g > 1)).any():
            bad = g[~(np.isfinite(g) & (g >= 0) & (g <= 1)).all(1)][0].tolist()
            raise ConfigError(f"point_grids[{i}] holds the point {bad}: points are x, y in [0, 1], "
                              "fractions of the width and height (divide pixels by them)")
    if len(out) < n_layers + 1:
        raise ConfigError(f"point_grids has {len(out)} grid(s); crop_n_layers={n_layers} needs {n_layers + 1}")
    return out


MIN_BATCHES_FOR_BAR = 4


def segment_everything(predictor, state, opts: dict[str, Any]) -> Results:
    """All masks of the encoded image ``state`` (an ``ImageState``) as one :class:`Results`.

    ``Results.masks`` ``(N, H, W)`` bool at the original size, ``scores`` the predicted IoU,
    ``records`` the SA-1B dict of each mask. Masks come in Meta's order (NMS order).
    """
    p = check_everything_options(opts)
    model = predictor._require_model()
    half = bool(opts.get("half", False))
    t_start = time.perf_counter()
    h, w = state.original_size
    crop_boxes, layer_idxs = generate_crop_boxes((h, w), p.crop_n_layers, p.crop_overlap_ratio)
    found, timing = MaskSet(), {"preprocess": 0.0, "inference": 0.0}
    # A bar over the point batches of every crop for a long job (a 32×32 grid of ViT-B takes a
    # minute on a CPU): shown with verbose, else only on a terminal (tqdm's None), and cleared after.
    batches = sum(math.ceil(len(p.point_grids[layer]) / p.points_batch_size) for layer in layer_idxs)
    bar = tqdm(total=batches, desc="segment everything", unit="batch", leave=False,
               disable=True if batches < MIN_BATCHES_FOR_BAR else (False if opts.get("verbose") else None))
    with bar:  # closed (and cleared) whatever happens
        for ci, (box, layer) in enumerate(zip(crop_boxes, layer_idxs)):
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                bar.update(math.ceil(len(p.point_grids[layer]) / p.points_batch_size))
                continue  # crop layers of a tiny image can produce empty crops
            if layer == 0:
                feats, input_size = state.for_decoder(), state.input_size
            else:
                t0 = time.perf_counter()
                (feats, input_size, prep_ms), = predictor.encode([state.orig_img[y0:y1, x0:x1]], half=half,
                                                                 compile=bool(opts.get("compile", False)))
                feats = predictor.decoder_input(feats)
                timing["preprocess"] += prep_ms
                timing["inference"] += (time.perf_counter() - t0) * 1000 - prep_ms
            _process_crop(model, feats, box, ci, input_size, (h, w), p.point_grids[layer], p, half,
                          predictor.device, found, timing, bar)
    found = found.merged()
    if len(crop_boxes) > 1 and len(found):
        # Prefer masks from smaller crops (Meta: score = 1 / crop area).
        areas = torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in crop_boxes])
        scores = 1 / areas[found.crop[0]]
        keep = batched_nms(found.boxes[0].float(), scores, torch.zeros(len(found)), p.crop_nms_thresh)
        found = found.select(keep)
    if p.min_mask_region_area > 0 and len(found):
        found = _clean_small_regions(found, (h, w), p.min_mask_region_area, max(p.iou, p.crop_nms_thresh))
    masks, records = _outputs(found, crop_boxes, (h, w), predictor.device)
    total = (time.perf_counter() - t_start) * 1000
    return Results(
        orig_img=state.orig_img,
        path=state.path,
        masks=masks,
        scores=found.iou[0],
        cls=torch.arange(len(found)),
        speed=dict(preprocess=state.preprocess_ms + timing["preprocess"],
                   inference=state.encode_ms + timing["inference"],
                   postprocess=total - timing["preprocess"] - timing["inference"]),
        records=records,
    )


def _process_crop(model, feats, box, ci, input_size, orig_size, grid, p, half, device, found, timing, bar) -> None:
    """Decode the crop's point grid in batches; keep its masks that survive NMS within the crop."""
    x0, y0, x1, y1 = box
    crop_hw = (y1 - y0, x1 - x0)
    pts_crop = grid * np.array([[crop_hw[1], crop_hw[0]]], dtype=np.float64)  # Meta's float64 points
    pts_in = torch.as_tensor(scale_coords(pts_crop, crop_hw, input_size), dtype=torch.float32, device=device)
    pts_crop_t = torch.from_numpy(pts_crop)
    upsample = Upsampler(model, input_size, crop_hw)
    crop_set = MaskSet()
    with torch.inference_mode(), autocast(device, half):
        for s in range(0, len(pts_crop), p.points_batch_size):
            sl = slice(s, s + p.points_batch_size)
            timing["inference"] += process_batch(model, feats, pts_in[sl], pts_crop_t[sl], list(box), ci,
                                                 upsample, orig_size, p, crop_set)
            bar.update()
    crop_set = crop_set.merged()
    if not len(crop_set):
        return
    keep = batched_nms(crop_set.boxes[0].float(), crop_set.iou[0], torch.zeros(len(crop_set)), p.iou)
    crop_set = crop_set.select(keep)
    found.add(crop_set.counts, crop_set.area[0], crop_set.boxes[0] + torch.tensor([x0, y0, x0, y0]), crop_set.iou[0],
              crop_set.stability[0], crop_set.points[0] + torch.tensor([x0, y0], dtype=torch.float64),
              crop_set.crop[0])


def _clean_small_regions(found: MaskSet, size: tuple[int, int], min_area: float, nms_thresh: float) -> MaskSet:
    """Meta's ``postprocess_small_regions``, one mask at a time: fill small holes, drop small
    islands, then NMS on the new boxes preferring unchanged masks (score 1, changed 0)."""
    h, w = size
    boxes, area = found.boxes[0].clone(), found.area[0].clone()
    all_counts, scores = list(found.counts), []
    for i, counts in enumerate(found.counts):
        mask = counts_to_masks([counts], size)[0].numpy()
        mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
        mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
        changed = changed_holes or changed_islands
        scores.append(0.0 if changed else 1.0)
        if changed:
            mask = np.ascontiguousarray(mask)
            boxes[i] = batched_mask_to_box(torch.from_numpy(mask)[None])[0]
            counts = mask_to_counts(mask)
            all_counts[i], area[i] = counts, int(counts[1::2].sum())
    keep = batched_nms(boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), nms_thresh)
    found = MaskSet(all_counts, [area], [boxes], found.iou, found.stability, found.points, found.crop)
    return found.select(keep)


def _outputs(found: MaskSet, crop_boxes: list[list[int]], size: tuple[int, int], device: torch.device
             ) -> tuple[torch.Tensor, list[dict]]:
    """Masks ``(N, H, W)`` bool on ``device`` rebuilt from the kept run-length codes, and the
    SA-1B records (with COCO's compressed RLE)."""
    h, w = size
    areas = found.area[0]
    xywh = box_xyxy_to_xywh(found.boxes[0], empty=areas == 0).tolist()
    iou, stab = found.iou[0].tolist(), found.stability[0].tolist()
    points, crops, areas = found.points[0].tolist(), found.crop[0].tolist(), areas.tolist()
    records = []
    for i, counts in enumerate(found.counts):
        x0, y0, x1, y1 = crop_boxes[crops[i]]
        records.append({
            "segmentation": {"size": [h, w], "counts": encode_counts(counts, size)["counts"].decode("ascii")},
            "area": areas[i],
            "bbox": xywh[i],
            "predicted_iou": iou[i],
            "point_coords": [points[i]],
            "stability_score": stab[i],
            "crop_box": [x0, y0, x1 - x0, y1 - y0],
        })
    return counts_to_masks(found.counts, size, device), records
