"""Validation as the SAM paper evaluates single-object prompts: for every ground-truth instance,
the mIoU of the mask from one box, from one point, and from several points.

- ``box``: the instance's tight box, one output.
- ``point_best3``: the most interior point of the instance, 3 outputs, the best by IoU with the
  ground truth (the paper's "oracle"); ``point_auto``: the one with the highest predicted IoU;
  ``point_single``: the same point with one output.
- ``points_K``: the point above, then ``K - 1`` corrective clicks, each at the most interior point
  of the larger error region (positive on a miss, negative on a false positive), with the previous
  low-res logits fed back as the mask prompt.
- ``everything`` (opt-in, slower): segment-everything with default parameters; the share of
  ground-truth instances that some mask matches with IoU ≥ 0.8 (``everything_recall``), and the
  mean number of masks per image.

IoU is measured at the original image size. ``runner=`` replaces the model by any object with
``set_sample(sample)`` and ``__call__(boxes=, points=, labels=, mask_input=, multimask=)`` →
``(masks (N, K, H, W) bool, iou_pred (N, K), low_res_logits or None)``, e.g. an oracle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import Sample, load_dataset
from ..engine.device import select_device
from ..engine.transforms import image_to_tensor, scale_coords
from ..errors import ConfigError
from .losses import mask_iou
from .prompts_sim import center_point, corrective_point, mask_box

KINDS = ("box", "point", "points")
EVERYTHING_IOU = 0.8


class SamRunner:
    """Prompts in original pixels → masks at the original size, from a SAM model."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.emb = None

    @torch.inference_mode()
    def set_sample(self, sample: Sample) -> None:
        h, w = sample.image.shape[:2]
        self.original_size, self.input_size = (h, w), self.model.input_size(h, w)
        x = image_to_tensor(sample.image, self.input_size, self.device)
        self.emb = self.model.encode_image(self.model.preprocess(x))

    @torch.inference_mode()
    def __call__(self, boxes=None, points=None, labels=None, mask_input=None, multimask=False):
        dev, o, i = self.device, self.original_size, self.input_size
        b = p = None
        if boxes is not None:
            b = torch.as_tensor(scale_coords(boxes.reshape(-1, 2, 2), o, i).reshape(-1, 4), dtype=torch.float32,
                                device=dev)
        if points is not None:
            p = (torch.as_tensor(scale_coords(points, o, i), dtype=torch.float32, device=dev),
                 torch.as_tensor(labels, dtype=torch.int64, device=dev))
        logits, iou = self.model.decode(self.emb, points=p, boxes=b, mask_inputs=mask_input,
                                        multimask_output=multimask)
        # In chunks: the float upsampled copy of many masks of a large image is what takes memory.
        masks = torch.cat([self.model.postprocess_masks(logits[s : s + 8], i, o) > self.model.mask_threshold
                           for s in range(0, len(logits), 8)])
        return masks, iou, logits


class OracleRunner:
    """A stand-in model that answers every prompt with the ground truth (``"perfect"``) or with
    empty masks (``"empty"``): checks of the metric itself."""

    def __init__(self, mode: str = "perfect") -> None:
        self.mode = mode

    def set_sample(self, sample: Sample) -> None:
        self.masks = torch.from_numpy(sample.masks)
        self.order: list[int] = []

    def __call__(self, boxes=None, points=None, labels=None, mask_input=None, multimask=False):
        n, k = len(self.order), 3 if multimask else 1
        m = self.masks[self.order][:, None].expand(n, k, *self.masks.shape[1:]).clone()
        if self.mode == "empty":
            m.zero_()
        return m, torch.ones(n, k), None


def val(model: Any = None, data: Any = None, kinds: tuple[str, ...] = KINDS, n_points: int = 3,
        max_images: int | None = None, max_instances: int | None = None, device: Any = "",
        runner: Any = None, save_json: str | Path | None = None, verbose: bool = True,
        threads: int | None = None) -> dict[str, Any]:
    """mIoU of ``model`` on ``data`` per prompt kind; prints a table and returns a dict
    (``box``, ``point_best3``, ``point_auto``, ``point_single``, ``points_{n_points}``, counts)."""
    from .common import resolve_model

    if threads:
        torch.set_num_threads(threads)
    if data is None:
        raise ConfigError("val needs data= (a COCO .json, a YOLO-seg folder or 'synthetic:N:SEED')")
    unknown = [k for k in kinds if k not in KINDS + ("everything",)]
    if unknown or not kinds:
        raise ConfigError(f"kinds={','.join(kinds)}: choose from {', '.join(KINDS + ('everything',))}")
    for key, value in (("n_points", n_points), ("max_images", max_images), ("max_instances", max_instances)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r}: expected a whole number >= 1" + (" (or None for all)" * (key != "n_points")))
    ds = load_dataset(data)
    dev = select_device(device)
    config = None
    if runner is None:
        net, config = resolve_model(model, training=False)
        net.to(dev).eval()
        runner = SamRunner(net, dev)
    everything = None
    if "everything" in kinds:
        if not isinstance(runner, SamRunner):
            raise ValueError("kinds='everything' needs a model, not a runner")
        from ..engine.predictor import Predictor

        everything = Predictor(overrides=dict(device=str(dev), verbose=False), model=runner.model, config=config)
    ious: dict[str, list[float]] = {}
    empty = 0
    n_img = min(len(ds), max_images) if max_images else len(ds)
    for idx in _progress(range(n_img), verbose):
        sample = ds[idx]
        keep = [j for j in range(len(sample.masks)) if sample.masks[j].any()][:max_instances]
        if not keep:  # nothing to prompt: counted, so a summary does not hide it
            empty += 1
            continue
        sample = Sample(sample.image, sample.masks[keep], sample.classes[keep], sample.path)
        runner.set_sample(sample)
        if isinstance(runner, OracleRunner):
            runner.order = list(range(len(keep)))
        gt = torch.from_numpy(sample.masks)
        _evaluate(runner, sample.masks, gt, kinds, n_points, ious)
        if everything is not None:
            found = everything(source=sample.image)[0].masks
            masks = found.data.cpu() if found is not None else torch.zeros((0, *gt.shape[1:]), dtype=torch.bool)
            best = mask_iou(masks[None], gt[:, None]).amax(1) if len(masks) else torch.zeros(len(gt))
            ious.setdefault("everything_recall", []).extend((best >= EVERYTHING_IOU).float().tolist())
            ious.setdefault("everything_masks", []).append(float(len(masks)))
    out: dict[str, Any] = {k: float(np.mean(v)) if v else float("nan") for k, v in ious.items()}
    out["images"] = n_img
    out["images_without_instances"] = empty
    out["instances"] = len(next((v for k, v in ious.items() if k != "everything_masks"), []))
    if verbose:
        print(format_table(out))
    if save_json:
        Path(save_json).parent.mkdir(parents=True, exist_ok=True)
        Path(save_json).write_text(json.dumps(out, indent=2))
    return out


def _evaluate(runner, masks_np: np.ndarray, gt: torch.Tensor, kinds, n_points: int, ious: dict) -> None:
    def add(key: str, values: torch.Tensor) -> None:
        ious.setdefault(key, []).extend(values.float().tolist())

    if "box" in kinds:
        boxes = np.stack([mask_box(m) for m in masks_np])
        m, _, _ = runner(boxes=boxes)
        add("box", mask_iou(m[:, 0].cpu(), gt))
    if "point" in kinds or "points" in kinds:
        pts = np.stack([center_point(m) for m in masks_np])[:, None]
        labels = np.ones(pts.shape[:2], np.int64)
        m, score, logits = runner(points=pts, labels=labels, multimask=True)
        all_iou = mask_iou(m.cpu(), gt[:, None])  # (N, 3)
        auto = score.cpu().argmax(1)
        rows = torch.arange(len(gt))
        if "point" in kinds:
            add("point_best3", all_iou.max(1).values)
            add("point_auto", all_iou[rows, auto])
            m1, _, _ = runner(points=pts, labels=labels, multimask=False)
            add("point_single", mask_iou(m1[:, 0].cpu(), gt))
        if "points" in kinds and n_points > 1:
            prev = m[rows, auto].cpu().numpy()
            prev_logits = None if logits is None else logits[rows, auto][:, None]
            for _ in range(n_points - 1):
                new_pts, new_lab = [], []
                for k in range(len(gt)):
                    c = corrective_point(prev[k], masks_np[k])
                    c = c if c is not None else (pts[k, 0], 1)  # already right: repeat the first click
                    new_pts.append(c[0])
                    new_lab.append(c[1])
                pts = np.concatenate([pts, np.stack(new_pts)[:, None]], 1)
                labels = np.concatenate([labels, np.array(new_lab)[:, None]], 1)
                m1, _, lg = runner(points=pts, labels=labels, mask_input=prev_logits, multimask=False)
                prev, prev_logits = m1[:, 0].cpu().numpy(), lg
            add(f"points_{n_points}", mask_iou(torch.from_numpy(prev), gt))


def format_table(res: dict[str, Any]) -> str:
    """The metrics as a two-column text table."""
    rows = [(k, v) for k, v in res.items() if k not in ("images", "instances", "images_without_instances")]
    lines = [f"{'prompt':<14}{'mIoU':>8}", "-" * 22]
    lines += [f"{k:<14}{v:>8.4f}" for k, v in rows]
    empty = res.get("images_without_instances", 0)
    lines.append(f"{res.get('images', 0)} images, {res.get('instances', 0)} instances"
                 + (f" ({empty} images without instances, skipped)" if empty else ""))
    return "\n".join(lines)


def _progress(it, verbose: bool):
    if not verbose:
        return it
    from tqdm import tqdm

    return tqdm(it, desc="val", leave=False, dynamic_ncols=True)
