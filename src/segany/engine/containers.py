"""``Masks`` and ``Boxes``: the per-mask containers of :class:`~segany.engine.results.Results`,
shaped like Ultralytics' classes of the same names (``data`` plus derived views, indexing,
``cpu()`` / ``numpy()`` / ``to()``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .export import to_numpy
from .polygons import mask_contours, merge_contours

ArrayLike = torch.Tensor | np.ndarray


def index_positions(idx: Any, n: int) -> np.ndarray:
    """Any index (int, slice, list, bool/int array or tensor) → 1-D int positions; an int keeps
    the dimension, so ``results[0]`` is a Results with one mask (as in Ultralytics)."""
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    return np.atleast_1d(np.arange(n)[idx]).astype(np.int64)


def take(x: ArrayLike, sel: np.ndarray) -> ArrayLike:
    return x[torch.as_tensor(sel, device=x.device)] if isinstance(x, torch.Tensor) else x[sel]


def convert(x: ArrayLike | None, how: str, device: Any = None) -> ArrayLike | None:
    """``how`` = "cpu" | "numpy" | "to" applied to a tensor or array (numpy stays numpy on cpu())."""
    if x is None:
        return None
    if how == "numpy":
        return to_numpy(x)
    if how == "cpu":
        return x.cpu() if isinstance(x, torch.Tensor) else x
    return torch.as_tensor(x).to(device)


class Masks:
    """``data``: ``(N, H, W)`` bool tensor (or array after ``numpy()``); ``orig_shape``: ``(H, W)``.

    ``xy`` / ``xyn``: one ``(K, 2)`` float32 polygon per mask in pixels / normalised to 0..1
    (parts of a multi-part mask merged with zero-width bridges; empty mask → ``(0, 2)``).
    Polygons are traced and merged once and cached; callers get copies.
    """

    def __init__(self, masks: ArrayLike, orig_shape: tuple[int, int]) -> None:
        if not isinstance(masks, (torch.Tensor, np.ndarray)):
            masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W) or (H, W), got shape {tuple(masks.shape)}")
        if tuple(masks.shape[1:]) != tuple(int(s) for s in orig_shape):
            # Polygons are in the masks' pixels: xyn and boxes would be normalised by the wrong size.
            raise ValueError(f"masks are {tuple(masks.shape[1:])} but orig_shape is {tuple(orig_shape)}: "
                             "upsample the masks to the original image size first")
        is_bool = masks.dtype == torch.bool if isinstance(masks, torch.Tensor) else masks.dtype == np.bool_
        if not is_bool:
            masks = masks > 0  # logits threshold at 0.0; 0/1 and 0/255 masks too
        self.data = masks
        self.orig_shape = tuple(int(s) for s in orig_shape)
        # Per mask: (outer contours, merged polygon) once traced; merging a mask of many parts
        # is slow, and xy[i] in a loop over masks would otherwise re-merge every mask each time.
        self._cache: list[tuple[list[np.ndarray], np.ndarray] | None] = [None] * len(masks)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, idx: Any) -> Masks:
        sel = index_positions(idx, len(self))
        return self._new(take(self.data, sel), [self._cache[i] for i in sel])

    def _new(self, data: ArrayLike, cache: list) -> Masks:
        out = Masks.__new__(Masks)
        out.data, out.orig_shape, out._cache = data, self.orig_shape, list(cache)
        return out

    def cpu(self) -> Masks:
        return self._new(convert(self.data, "cpu"), self._cache)

    def numpy(self) -> Masks:
        return self._new(convert(self.data, "numpy"), self._cache)

    def to(self, device: Any) -> Masks:
        return self._new(convert(self.data, "to", device), self._cache)

    def cuda(self) -> Masks:
        return self.to("cuda")

    def _traced(self, i: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The cached ``(contours, merged polygon)`` of mask ``i`` (not to be modified)."""
        i = range(len(self))[i]  # negative indices, and IndexError when out of range
        if self._cache[i] is None:
            contours = mask_contours(to_numpy(self.data[i]))
            self._cache[i] = (contours, merge_contours(contours))
        return self._cache[i]

    def contours(self, i: int) -> list[np.ndarray]:
        """Separate outer contours of mask ``i``: ``(K, 2)`` float32 pixel arrays, largest first."""
        return [c.copy() for c in self._traced(i)[0]]

    @property
    def xy(self) -> list[np.ndarray]:
        """One merged ``(K, 2)`` float32 polygon per mask, in pixels."""
        return [self._traced(i)[1].copy() for i in range(len(self))]

    @property
    def xyn(self) -> list[np.ndarray]:
        """:attr:`xy` divided by ``(W, H)``: coordinates in 0..1."""
        h, w = self.orig_shape
        scale = np.array([w, h], np.float32)
        return [p / scale for p in self.xy]

    def __repr__(self) -> str:
        return f"Masks(shape={self.shape}, dtype={self.data.dtype})"


class Boxes:
    """``data``: ``(N, 6)`` = ``x1, y1, x2, y2, conf, cls`` (or ``(N, 7)`` with a track id before
    ``conf``, as in Ultralytics). ``cls`` is a float column like Ultralytics' (use ``int()``)."""

    def __init__(self, boxes: ArrayLike, orig_shape: tuple[int, int]) -> None:
        if not isinstance(boxes, (torch.Tensor, np.ndarray)):
            boxes = np.asarray(boxes, np.float32)
        if boxes.ndim == 1:
            boxes = boxes[None]
        if boxes.ndim != 2 or boxes.shape[1] not in (6, 7):
            raise ValueError(f"boxes must be (N, 6) or (N, 7), got shape {tuple(boxes.shape)}")
        self.data = boxes
        self.orig_shape = tuple(int(s) for s in orig_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def is_track(self) -> bool:
        """Whether the boxes carry track ids (7 columns), as in Ultralytics."""
        return self.data.shape[1] == 7

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, idx: Any) -> Boxes:
        return Boxes(take(self.data, index_positions(idx, len(self))), self.orig_shape)

    def cpu(self) -> Boxes:
        return Boxes(convert(self.data, "cpu"), self.orig_shape)

    def numpy(self) -> Boxes:
        return Boxes(convert(self.data, "numpy"), self.orig_shape)

    def to(self, device: Any) -> Boxes:
        return Boxes(convert(self.data, "to", device), self.orig_shape)

    def cuda(self) -> Boxes:
        return self.to("cuda")

    @property
    def xyxy(self) -> ArrayLike:
        """``(N, 4)`` ``x1, y1, x2, y2`` in pixels; ``x2 = max x + 1`` (pixel edges)."""
        return self.data[:, :4]

    @property
    def conf(self) -> ArrayLike:
        """``(N,)`` scores (predicted IoU for SAM)."""
        return self.data[:, -2]

    @property
    def cls(self) -> ArrayLike:
        """``(N,)`` classes as floats (the prompt index for prompted SAM)."""
        return self.data[:, -1]

    @property
    def id(self) -> ArrayLike | None:
        """``(N,)`` track ids, or ``None`` without them."""
        return self.data[:, -3] if self.is_track else None

    @property
    def xywh(self) -> ArrayLike:
        """``(N, 4)`` centre x, centre y, width, height in pixels."""
        b = self.xyxy
        cat = torch.stack if isinstance(b, torch.Tensor) else np.stack
        return cat([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)

    def _normalise(self, b: ArrayLike) -> ArrayLike:
        h, w = self.orig_shape
        if isinstance(b, torch.Tensor):
            return b / torch.tensor([w, h, w, h], dtype=b.dtype, device=b.device)
        return b / np.array([w, h, w, h], dtype=b.dtype)

    @property
    def xyxyn(self) -> ArrayLike:
        """:attr:`xyxy` divided by ``(W, H, W, H)``."""
        return self._normalise(self.xyxy)

    @property
    def xywhn(self) -> ArrayLike:
        """:attr:`xywh` divided by ``(W, H, W, H)``."""
        return self._normalise(self.xywh)

    def __repr__(self) -> str:
        return f"Boxes(shape={self.shape})"
