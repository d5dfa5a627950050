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
  column-major order (never padding a mask to the image), and are kept compressed (COCO's
  string form, what the records carry anyway; ~8x smaller than int64 counts for noisy masks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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


@dataclass
class MaskSet:
    """Masks kept so far, as run-length codes plus their per-mask fields (all on the CPU)."""

    rles: list[dict] = field(default_factory=list)  # compressed COCO RLE of the mask in the image
    area: list[torch.Tensor] = field(default_factory=list)  # (n,) int64 pixel counts
    boxes: list[torch.Tensor] = field(default_factory=list)  # (n, 4) int64 XYXY inclusive
    iou: list[torch.Tensor] = field(default_factory=list)  # (n,) float32 predicted IoU
    stability: list[torch.Tensor] = field(default_factory=list)  # (n,) float32
    points: list[torch.Tensor] = field(default_factory=list)  # (n, 2) float64 x, y
    crop: list[torch.Tensor] = field(default_factory=list)  # (n,) int64 crop index

    def add(self, rles, area, boxes, iou, stability, points, crop) -> None:
        self.rles.extend(rles)
        for name, v in (("area", area), ("boxes", boxes), ("iou", iou), ("stability", stability),
                        ("points", points), ("crop", crop)):
            getattr(self, name).append(torch.as_tensor(v).cpu())

    def merged(self) -> MaskSet:
        """One tensor per field (empty tensors of the right shape when there are no masks)."""
        def cat(parts, shape, dtype):
            return [torch.cat(parts)] if parts else [torch.zeros(shape, dtype=dtype)]
        return MaskSet(self.rles, cat(self.area, (0,), torch.int64), cat(self.boxes, (0, 4), torch.int64),
                       cat(self.iou, (0,), torch.float32),
                       cat(self.stability, (0,), torch.float32), cat(self.points, (0, 2), torch.float64),
                       cat(self.crop, (0,), torch.int64))

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, idx: torch.Tensor) -> MaskSet:
        """Masks ``idx`` (in that order) of a :meth:`merged` set."""
        il = idx.tolist()
        return MaskSet([self.rles[i] for i in il], [self.area[0][idx]], [self.boxes[0][idx]], [self.iou[0][idx]],
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


class Upsampler:
    """Low-res logits ``(k, s, s)`` → logits at the crop size, *transposed*: ``(k, w, h)``.

    Equal (to float rounding, < 1e-5) to ``model.postprocess_masks(...).transpose(-1, -2)``.
    The matrix form is used when a probe shows it reproduces the model's upsampling; otherwise
    the model's own ``postprocess_masks`` runs.
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
    decode_ms = (time.perf_counter() - t0) * 1000
    k = low.shape[1]
    low, iou = low.flatten(0, 1).float(), iou.flatten(0, 1).float()
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
        boxes = torch.tensor(np.array([_box(j, h) for j in trans], dtype=np.int64).reshape(-1, 4))
        # Masks near a crop edge that is not an image edge are probably cut off by the crop.
        ok = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        kept = ok.nonzero()[:, 0].tolist()
        if not kept:
            continue
        counts = [transitions_to_counts(trans[i], h, crop_box, orig_size) for i in kept]
        area = torch.tensor([int(c[1::2].sum()) for c in counts], dtype=torch.int64)
        rles = [encode_counts(c, orig_size) for c in counts]
        sel = sel[ok]
        pts = points_crop[point_idx[sel.to(dev)].cpu()]
        out.add(rles, area, boxes[ok], iou[sel.to(dev)], stab[ok], pts,
                torch.full((len(rles),), crop_idx, dtype=torch.int64))
    return decode_ms


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


def column_transitions(logits_t: torch.Tensor, thr: float, use_numpy: bool | None = None) -> list[np.ndarray]:
    """Transposed logits (or bool masks) ``(n, w, h)`` → per mask the sorted positions
    ``c * (h + 1) + r`` where column ``c`` of the mask ``logits > thr`` switches on or off
    before row ``r`` (0..h). The positions are found with numpy on the CPU, torch elsewhere."""
    n, w, h = logits_t.shape
    padded = torch.zeros((n, w, h + 2), dtype=torch.bool, device=logits_t.device)
    if logits_t.dtype == torch.bool:
        padded[:, :, 1 : h + 1] = logits_t
    else:
        torch.gt(logits_t, thr, out=padded[:, :, 1 : h + 1])
    change = padded[:, :, 1:] != padded[:, :, :-1]  # (n, w, h + 1)
    del padded
    if change.device.type == "cpu" if use_numpy is None else use_numpy:
        a = change.numpy().reshape(n, -1)
        return [np.flatnonzero(a[i]) for i in range(n)]
    idx = torch.nonzero(change.view(n, -1)).cpu().numpy()
    bounds = np.searchsorted(idx[:, 0], np.arange(n + 1))
    return [idx[bounds[i] : bounds[i + 1], 1] for i in range(n)]


def _box(j: np.ndarray, h: int) -> tuple[int, int, int, int]:
    """XYXY inclusive box of a mask from its transitions; ``(0, 0, 0, 0)`` when empty (Meta)."""
    if j.size == 0:
        return 0, 0, 0, 0
    r = j % (h + 1)
    # In each column the first transition is a run start and the last a run end, so the
    # extreme rows of all transitions are the top row and one past the bottom row.
    return int(j[0] // (h + 1)), int(r.min()), int(j[-1] // (h + 1)), int(r.max()) - 1


def transitions_to_counts(j: np.ndarray, h: int, crop_box: list[int], orig_size: tuple[int, int]) -> np.ndarray:
    """Transitions of a crop mask (see :func:`column_transitions`) → COCO counts of the mask
    placed in the ``orig_size`` image (equal to Meta's RLE of ``uncrop_masks``)."""
    big_h, big_w = orig_size
    length = big_h * big_w
    c, r = np.divmod(j, h + 1)
    pos = (c + int(crop_box[0])) * big_h + (r + int(crop_box[1]))
    if h == big_h and pos.size > 1:
        # A run ending at the bottom of column c and one starting at the top of column c + 1
        # are one run in the image (columns are adjacent in column-major order).
        dup = np.flatnonzero(pos[1:] == pos[:-1])
        if dup.size:
            pos = np.delete(pos, np.concatenate([dup, dup + 1]))
    if pos.size and pos[-1] == length:
        pos = pos[:-1]  # a run reaching the last pixel: no trailing empty run
    return np.diff(pos, prepend=0, append=length)


def mask_to_counts(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool mask → COCO counts (int64, column-major)."""
    h, w = mask.shape
    j = column_transitions(torch.from_numpy(mask.T)[None], 0.0)[0]
    return transitions_to_counts(j, h, [0, 0, w, h], (h, w))


def encode_counts(counts: np.ndarray, size: tuple[int, int]) -> dict:
    """COCO counts → compressed COCO RLE ``{"size": [H, W], "counts": bytes}`` (pycocotools)."""
    return mask_utils.frPyObjects({"size": list(size), "counts": counts}, *size)


def decode_rle(rle: dict) -> np.ndarray:
    """Compressed COCO RLE → ``(H, W)`` bool mask (Fortran order)."""
    return mask_utils.decode(rle).view(bool)
