"""Per-batch work of segment-everything: point prompts → filtered masks as run-length codes.

Meta's ``SamAutomaticMaskGenerator._process_batch`` upsamples every mask of a batch to full
resolution at once, pads crop masks to the whole image and run-length encodes into Python
lists. Here the same filters run in the same order on the same values, but:

- the predicted-IoU filter runs before upsampling, so rejected masks are never upsampled;
- the model's bilinear upsampling (padded input → crop → original size) is applied as two small
  matrices, ``R @ L @ C.T``, found once per crop size and checked against the model's own
  ``postprocess_masks`` (any other model uses ``postprocess_masks`` itself); the product comes
  out transposed, i.e. in COCO's column-major order, so run-length coding needs no transpose;
- masks go through in chunks whose float copy stays under :data:`UPSAMPLE_BYTES`, so memory
  does not grow with the batch or the image size;
- pixel counts use ``numpy.count_nonzero`` on the CPU (a torch ``sum`` of booleans is ~100x
  slower there); run-length codes come from the crop-sized masks, shifted into the image's
  column-major order (never padding a mask to the image), kept as int32 counts (compressed to
  COCO's string form only for the masks that survive NMS, for the records);
- the surviving masks are rebuilt from their counts where ``Results`` keeps them (on a GPU: the
  run boundaries are scattered and summed there, then transposed; no full-size mask crosses
  the bus), not decoded by pycocotools and transposed on the host (~2 ms a 1024×768 mask).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F

from .amg_utils import is_box_near_crop_edge
from .decoding import decode_in_chunks

# float32 bytes of upsampled logits alive at once. On a GPU each chunk costs a few host syncs, so
# chunks are large there (a 64-point batch of a 1024×768 image in one); on the CPU small chunks
# stay in cache.
UPSAMPLE_BYTES = {"cpu": 64 * 2**20, "cuda": 2**30}
# Working bytes of a chunk of output masks rebuilt on a GPU (see _sum_boundaries).
BOUNDARY_BYTES = 256 * 2**20


@dataclass
class MaskSet:
    """Masks kept so far, as run-length codes plus their per-mask fields (all on the CPU)."""

    counts: list[np.ndarray] = field(default_factory=list)  # int32 COCO counts of the mask in the image
    area: list[torch.Tensor] = field(default_factory=list)  # (n,) int64 pixel counts
    boxes: list[torch.Tensor] = field(default_factory=list)  # (n, 4) int64 XYXY inclusive
    iou: list[torch.Tensor] = field(default_factory=list)  # (n,) float32 predicted IoU
    stability: list[torch.Tensor] = field(default_factory=list)  # (n,) float32
    points: list[torch.Tensor] = field(default_factory=list)  # (n, 2) float64 x, y
    crop: list[torch.Tensor] = field(default_factory=list)  # (n,) int64 crop index

    def add(self, counts, area, boxes, iou, stability, points, crop) -> None:
        self.counts.extend(counts)
        for name, v in (("area", area), ("boxes", boxes), ("iou", iou), ("stability", stability),
                        ("points", points), ("crop", crop)):
            getattr(self, name).append(torch.as_tensor(v).cpu())

    def merged(self) -> MaskSet:
        """One tensor per field (empty tensors of the right shape when there are no masks)."""
        def cat(parts, shape, dtype):
            return [torch.cat(parts)] if parts else [torch.zeros(shape, dtype=dtype)]
        return MaskSet(self.counts, cat(self.area, (0,), torch.int64), cat(self.boxes, (0, 4), torch.int64),
                       cat(self.iou, (0,), torch.float32),
                       cat(self.stability, (0,), torch.float32), cat(self.points, (0, 2), torch.float64),
                       cat(self.crop, (0,), torch.int64))

    def __len__(self) -> int:
        return len(self.counts)

    def select(self, idx: torch.Tensor) -> MaskSet:
        """Masks ``idx`` (in that order) of a :meth:`merged` set."""
        il = idx.tolist()
        return MaskSet([self.counts[i] for i in il], [self.area[0][idx]], [self.boxes[0][idx]], [self.iou[0][idx]],
                       [self.stability[0][idx]], [self.points[0][idx]], [self.crop[0][idx]])


# ----------------------------------------------------------------------------- upsampling
def _resize_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of a 1-D bilinear resize (align_corners=False), PyTorch's weights."""
    eye = torch.eye(n_in, device=device)[None, None]
    return F.interpolate(eye, (n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


def _axis_operator(kind: str, model, s: int, inp: int, out: int, device: torch.device) -> torch.Tensor | None:
    """``(out, s)`` operator of one axis: ``"pad_crop_resize"`` (SAM: upsample to the padded
    input size, crop to ``inp``, resize to ``out``) or ``"resize"`` (SAM 2: straight to ``out``)."""
    if kind == "resize":
        return _resize_matrix(s, out, device)
    img_size = getattr(model, "img_size", None)
    if not isinstance(img_size, int) or img_size % s or inp > img_size:
        return None
    return _resize_matrix(inp, out, device) @ _resize_matrix(s, img_size, device)[:inp]


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: ``half=True`` decodes under bf16 autocast, which would turn the
    upsampling matrix products into bf16 ones (logits off by ~0.1, and the probe failing)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to turn off
        return contextlib.nullcontext()


class Upsampler:
    """Low-res logits ``(k, s, s)`` → logits at the crop size, *transposed*: ``(k, w, h)``.

    Equal (to float rounding, < 1e-5) to ``model.postprocess_masks(...).transpose(-1, -2)``
    in fp32, also under autocast. The matrix form is used when a probe shows it reproduces the
    model's upsampling; otherwise the model's own ``postprocess_masks`` runs.
    """

    def __init__(self, model, input_size: tuple[int, int], crop_hw: tuple[int, int]) -> None:
        self.model, self.input_size, self.crop_hw = model, input_size, crop_hw
        self.size = None  # low-res side the operators were built for
        self.rows = self.cols = None

    def _build(self, s: int, device: torch.device) -> None:
        self.size, self.rows, self.cols = s, None, None
        # Which form matches the model is checked on an output of at most 97 (a prime: no
        # integer ratio to the low-res size, where different resizes could agree) a side.
        probe_hw = (min(self.crop_hw[0], 97), min(self.crop_hw[1], 97))
        g = torch.Generator().manual_seed(0)
        probe = (torch.randn(1, 1, s, s, generator=g) * 8).to(device)
        ref = self.model.postprocess_masks(probe, self.input_size, probe_hw)[0, 0].float()
        for kind in ("pad_crop_resize", "resize"):
            rows = _axis_operator(kind, self.model, s, self.input_size[0], probe_hw[0], device)
            cols = _axis_operator(kind, self.model, s, self.input_size[1], probe_hw[1], device)
            if rows is None or cols is None:
                continue
            got = rows @ probe[0, 0] @ cols.T
            if got.shape == ref.shape and float((got - ref).abs().max()) <= 1e-4:
                rows = _axis_operator(kind, self.model, s, self.input_size[0], self.crop_hw[0], device)
                cols = _axis_operator(kind, self.model, s, self.input_size[1], self.crop_hw[1], device)
                # Keep only the low-res rows/columns that reach the crop (the rest has weight 0).
                nr = int(rows.abs().sum(0).nonzero().max()) + 1
                nc = int(cols.abs().sum(0).nonzero().max()) + 1
                self.rows, self.cols = rows[:, :nr].contiguous(), cols[:, :nc].contiguous()
                return

    def __call__(self, low: torch.Tensor) -> torch.Tensor:
        with _fp32(low.device):
            return self._upsample(low.float())

    def _upsample(self, low: torch.Tensor) -> torch.Tensor:
        if self.size != low.shape[-1]:
            self._build(low.shape[-1], low.device)
        if self.rows is None:
            up = self.model.postprocess_masks(low[:, None], self.input_size, self.crop_hw)[:, 0].float()
            return up.transpose(1, 2)
        (h, nr), (w, nc) = self.rows.shape, self.cols.shape
        low_t = low[:, :nr, :nc].transpose(1, 2)
        # C @ L^T @ R^T = (R @ L @ C^T)^T: the transposed upsampled logits, contiguous. The
        # association with fewer multiply-adds depends on the aspect ratio.
        if w * nr * (nc + h) <= h * nc * (nr + w):
            return (self.cols @ low_t) @ self.rows.T
        return self.cols @ (low_t @ self.rows.T)


# ----------------------------------------------------------------------------- one batch
def process_batch(
    model, features, points_in: torch.Tensor, points_crop: torch.Tensor, crop_box: list[int], crop_idx: int,
    upsample: Upsampler, orig_size: tuple[int, int], p, out: MaskSet,
) -> float:
    """Decode one batch of points and append the surviving masks to ``out``.

    ``points_in`` ``(B, 2)`` float32 in the model's input frame; ``points_crop`` ``(B, 2)``
    float64 in the crop frame (what the record reports, after shifting by the crop origin).
    ``p`` holds the validated options (``everything.EverythingOptions``). Returns the
    milliseconds spent in the model's decoder.
    """
    dev = points_in.device
    labels = torch.ones(points_in.shape[0], 1, dtype=torch.int64, device=dev)
    t0 = time.perf_counter()
    low, iou = decode_in_chunks(model, features, points=(points_in[:, None, :], labels), multimask_output=True)
    k = low.shape[1]
    low, iou = low.flatten(0, 1), iou.flatten(0, 1)
    if p.use_m2m:
        low, iou = refine_with_masks(model, features, points_in.repeat_interleave(k, 0), low)
    decode_ms = (time.perf_counter() - t0) * 1000
    low, iou = low.float(), iou.float()
    point_idx = torch.arange(points_in.shape[0], device=dev).repeat_interleave(k)
    if p.conf_thres > 0.0:  # Meta: a threshold <= 0 turns the filter off
        keep = iou > p.conf_thres
        low, iou, point_idx = low[keep], iou[keep], point_idx[keep]

    h, w = upsample.crop_hw
    thr = float(model.mask_threshold)
    chunk = max(1, UPSAMPLE_BYTES.get(dev.type, UPSAMPLE_BYTES["cpu"]) // (4 * h * w))
    for s in range(0, low.shape[0], chunk):
        up_t = upsample(low[s : s + chunk])  # (n, w, h): column-major masks
        stab = stability_score(up_t, thr, p.stability_score_offset)
        sel = torch.arange(s, s + up_t.shape[0])
        if p.stability_score_thresh > 0.0:
            ok = stab >= p.stability_score_thresh
            up_t, stab, sel = up_t[ok.to(dev)], stab[ok], sel[ok]
        if up_t.shape[0] == 0:
            continue
        trans = column_transitions(up_t, thr)
        del up_t
        boxes = torch.from_numpy(transition_boxes(trans))
        # Masks near a crop edge that is not an image edge are probably cut off by the crop.
        ok = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        kept = ok.nonzero()[:, 0].numpy()
        if not kept.size:
            continue
        counts = transition_counts(trans, kept, crop_box, orig_size)
        area = torch.tensor([int(c[1::2].sum()) for c in counts], dtype=torch.int64)
        sel = sel[ok]
        pts = points_crop[point_idx[sel.to(dev)].cpu()]
        out.add(counts, area, boxes[ok], iou[sel.to(dev)], stab[ok], pts,
                torch.full((len(counts),), crop_idx, dtype=torch.int64))
    return decode_ms


def refine_with_masks(model, features, points_in: torch.Tensor, low: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's mask-to-mask refinement (``use_m2m``): each mask ``low`` ``(n, s, s)`` decoded
    again, one mask out, with its point ``points_in`` ``(n, 2)`` and itself as the mask prompt
    (clamped to ±32 as sam2's predictor returns them). → refined ``(n, s, s)`` logits and
    ``(n,)`` predicted IoU."""
    labels = torch.ones(points_in.shape[0], 1, dtype=torch.int64, device=points_in.device)
    low, iou = decode_in_chunks(model, features, points=(points_in[:, None, :], labels),
                                mask_inputs=low.clamp(-32.0, 32.0)[:, None], multimask_output=False)
    return low[:, 0], iou[:, 0]


def stability_score(logits: torch.Tensor, thr: float, offset: float) -> torch.Tensor:
    """``(n,)`` float32: pixels above ``thr + offset`` / pixels above ``thr - offset`` (Meta's
    stability score; NaN for an all-background mask, as Meta)."""
    hi = _count(logits > thr + offset)
    lo = _count(logits > thr - offset)
    return (torch.from_numpy(hi) / torch.from_numpy(lo)).float()


def _count(mask: torch.Tensor, use_numpy: bool | None = None) -> np.ndarray:
    """``(n, ...)`` bool → ``(n,)`` int64 pixel counts (numpy on the CPU, torch elsewhere)."""
    if not (mask.device.type == "cpu" if use_numpy is None else use_numpy):
        return mask.flatten(1).sum(1).cpu().numpy()
    a = mask.numpy()
    return np.array([np.count_nonzero(a[i]) for i in range(a.shape[0])], dtype=np.int64)


@dataclass
class Transitions:
    """Where the columns of ``n`` masks ``(n, w, h)`` (transposed: column-major) switch on or off:
    transition ``k`` is in mask ``mask[k]`` at ``pos[k] = c * (h + 1) + r``, column ``c`` changing
    before row ``r`` (0..h). Sorted by mask, then position."""

    mask: np.ndarray  # (M,) int64
    pos: np.ndarray  # (M,) int64
    n: int
    h: int

    def bounds(self) -> np.ndarray:
        """``(n + 1,)``: mask ``i``'s transitions are ``bounds[i]:bounds[i + 1]``."""
        return np.searchsorted(self.mask, np.arange(self.n + 1))


def column_transitions(logits_t: torch.Tensor, thr: float, use_numpy: bool | None = None) -> Transitions:
    """Transposed logits (or bool masks) ``(n, w, h)`` → the :class:`Transitions` of the masks
    ``logits > thr``, found with numpy on the CPU and torch elsewhere."""
    n, w, h = logits_t.shape
    padded = torch.zeros((n, w, h + 2), dtype=torch.bool, device=logits_t.device)
    if logits_t.dtype == torch.bool:
        padded[:, :, 1 : h + 1] = logits_t
    else:
        torch.gt(logits_t, thr, out=padded[:, :, 1 : h + 1])
    change = padded[:, :, 1:] != padded[:, :, :-1]  # (n, w, h + 1)
    del padded
    if change.device.type == "cpu" if use_numpy is None else use_numpy:
        mask, pos = np.nonzero(change.numpy().reshape(n, -1))
    else:
        mask, pos = torch.nonzero(change.view(n, -1)).cpu().numpy().T
    return Transitions(mask.astype(np.int64), pos.astype(np.int64), n, h)


def transition_boxes(t: Transitions) -> np.ndarray:
    """``(n, 4)`` int64 XYXY inclusive boxes of the masks; ``(0, 0, 0, 0)`` when empty (Meta)."""
    boxes = np.zeros((t.n, 4), dtype=np.int64)
    b = t.bounds()
    has = np.flatnonzero(b[1:] > b[:-1])
    if has.size == 0:
        return boxes
    col, row = np.divmod(t.pos, t.h + 1)
    # In each column the first transition starts a run and the last ends one, so the extreme
    # rows of all transitions are the top row and one past the bottom row.
    boxes[has, 0] = col[b[has]]
    boxes[has, 1] = np.minimum.reduceat(row, b[has])
    boxes[has, 2] = col[b[has + 1] - 1]
    boxes[has, 3] = np.maximum.reduceat(row, b[has]) - 1
    return boxes


def transition_counts(t: Transitions, keep: np.ndarray, crop_box: list[int], orig_size: tuple[int, int]
                      ) -> list[np.ndarray]:
    """COCO counts (int32, column-major) of masks ``keep`` (ascending) placed at ``crop_box`` in
    the ``orig_size`` image: equal to Meta's RLE of ``uncrop_masks``."""
    big_h, big_w = orig_size
    length = big_h * big_w
    chosen = np.zeros(t.n, dtype=bool)
    chosen[keep] = True
    sel = chosen[t.mask]
    mask, (col, row) = t.mask[sel], np.divmod(t.pos[sel], t.h + 1)
    pos = (col + int(crop_box[0])) * big_h + (row + int(crop_box[1]))
    drop = pos == length  # a run reaching the last pixel: no trailing empty run
    if t.h == big_h and pos.size > 1:
        # A run ending at the bottom of column c and one starting at the top of column c + 1
        # are one run in the image (columns are adjacent in column-major order).
        dup = np.flatnonzero((pos[1:] == pos[:-1]) & (mask[1:] == mask[:-1]))
        drop[dup] = drop[dup + 1] = True
    mask, pos = mask[~drop], pos[~drop]
    first = np.ones(pos.size, dtype=bool)
    first[1:] = mask[1:] != mask[:-1]
    runs = pos - np.where(first, 0, np.roll(pos, 1))  # each run up to a boundary
    starts, ends = np.searchsorted(mask, keep), np.searchsorted(mask, keep, side="right")
    last = np.zeros(len(keep), dtype=np.int64)  # each mask's last boundary (0: none)
    last[ends > starts] = pos[ends[ends > starts] - 1]
    counts = np.insert(runs, ends, length - last).astype(np.int32)  # + the run after the last boundary
    return np.split(counts, (ends + np.arange(1, len(keep) + 1))[:-1])


def mask_to_counts(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool mask → COCO counts (int32, column-major)."""
    h, w = mask.shape
    t = column_transitions(torch.from_numpy(mask.T)[None], 0.0)
    return transition_counts(t, np.zeros(1, dtype=np.int64), [0, 0, w, h], (h, w))[0]


def encode_counts(counts: np.ndarray, size: tuple[int, int]) -> dict:
    """COCO counts → compressed COCO RLE ``{"size": [H, W], "counts": bytes}`` (pycocotools)."""
    return mask_utils.frPyObjects({"size": list(size), "counts": counts}, *size)


def counts_to_masks(counts: list[np.ndarray], size: tuple[int, int], device: torch.device | str = "cpu"
                    ) -> torch.Tensor:
    """COCO counts (column-major) of ``size`` masks → ``(N, H, W)`` bool on ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return _fill_runs(counts, size)
    return _sum_boundaries(counts, size, device)


def _fill_runs(counts: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """On the CPU: each mask filled run by run (``numpy.repeat``), then transposed by OpenCV."""
    h, w = size
    out = torch.empty((len(counts), h, w), dtype=torch.bool)
    dst = out.numpy().view(np.uint8)
    parity = np.resize(np.array([0, 1], np.uint8), max((len(c) for c in counts), default=0))
    for i, c in enumerate(counts):
        cv2.transpose(np.repeat(parity[: len(c)], c).reshape(w, h), dst=dst[i])
    return out


def _sum_boundaries(counts: list[np.ndarray], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """On a GPU only the run boundaries travel: a chunk of masks gets a 1 at each boundary, a
    running sum along each column-major mask, its parity, and one transpose, on the device. The
    sums are bytes: they wrap at 256, which keeps their parity."""
    h, w = size
    out = torch.empty((len(counts), h, w), dtype=torch.bool, device=device)
    chunk = max(1, BOUNDARY_BYTES // (2 * h * w))  # the marks and their sums, a byte a pixel each
    for s in range(0, len(counts), chunk):
        part = counts[s : s + chunk]
        # Boundaries between runs; an empty first run puts one at 0, and the last run ends at h*w.
        flat = np.concatenate([np.cumsum(c[:-1], dtype=np.int64) + i * h * w for i, c in enumerate(part)])
        marks = torch.zeros(len(part) * h * w, dtype=torch.uint8, device=device)
        marks[torch.from_numpy(flat).to(device)] = 1
        on = torch.cumsum(marks.view(len(part), h * w), dim=1, dtype=torch.uint8).bitwise_and_(1)
        out[s : s + len(part)] = on.view(len(part), w, h).transpose(1, 2)
    return out
