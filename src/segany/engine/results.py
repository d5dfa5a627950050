"""Prediction results, shaped like Ultralytics' ``Results`` / ``Masks`` / ``Boxes``.

One :class:`Results` per image. ``masks.data`` is ``(N, H, W)`` bool at the original size;
no masks is an empty ``(0, H, W)`` Masks, never ``None``. Boxes are computed from the masks
(pixel-edge convention, see :mod:`segany.engine.polygons`). Polygons (``masks.xy``) are one merged
polygon per mask; the separate outer contours are in ``masks.contours(i)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import WeightsChangedError
from . import export, plotting
from .containers import ArrayLike, Boxes, Masks, convert, index_positions, take
from .deferred import refused
from .polygons import masks_to_boxes

__all__ = ["Boxes", "Masks", "Results"]


class Results:
    """Masks, scores and boxes predicted for one image, plus ways to draw and export them.

    ``orig_img``: ``(H, W, 3)`` uint8 BGR. ``masks``: ``(N, H, W)`` (bool, or thresholded at > 0),
    ``None`` → no masks. ``scores``: ``(N,)`` predicted IoU (default 1.0). ``cls``: ``(N,)`` ints
    (default the prompt index ``0..N-1``). ``low_res_logits``: ``(N, s, s)`` (s = 256 for the official models) kept for refinement
    prompts. ``names``: class names, a dict or a list (default ``{i: "i"}``). ``speed``: ms per stage.
    ``records``: optional SA-1B dicts from segment-everything, one per mask.
    """

    # Outputs of Ultralytics' other tasks: SAM never has them, but code written for any Ultralytics
    # Results tests ``r.obb is not None`` (and the like) before reading boxes and masks.
    probs: None = None
    keypoints: None = None
    obb: None = None

    def __init__(
        self,
        orig_img: np.ndarray,
        path: str,
        masks: ArrayLike | None,
        scores: ArrayLike | None = None,
        cls: ArrayLike | None = None,
        low_res_logits: ArrayLike | None = None,
        names: dict[int, str] | list[str] | None = None,
        speed: dict[str, float | None] | None = None,
        records: list[dict] | None = None,
    ) -> None:
        orig_img = np.asarray(orig_img)
        if (orig_img.ndim not in (2, 3) or orig_img.shape[0] == 0 or orig_img.shape[1] == 0
                or (orig_img.ndim == 3 and orig_img.shape[2] not in (1, 3, 4))):
            raise ValueError(f"orig_img must be an (H, W, 3) BGR image, got shape {orig_img.shape}")
        if orig_img.dtype != np.uint8:  # plot() and save() draw on 8-bit pixels
            raise ValueError(f"orig_img must be uint8 (0..255), got {orig_img.dtype}; convert it first, "
                             "e.g. (img * 255).round().astype(np.uint8) for a float image in 0..1")
        h, w = orig_img.shape[:2]
        if masks is None:
            masks = torch.zeros((0, h, w), dtype=torch.bool)
        if isinstance(masks, np.ndarray):
            masks = torch.from_numpy(np.ascontiguousarray(masks))
        masks = torch.as_tensor(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3 or tuple(masks.shape[1:]) != (h, w):
            raise ValueError(
                f"masks must be (N, {h}, {w}) to match the image, got {tuple(masks.shape)}; "
                "upsample them to the original image size first"
            )
        self.masks = Masks(masks, (h, w))
        n, dev = len(self.masks), masks.device
        scores = torch.ones(n) if scores is None else torch.as_tensor(scores)
        cls = torch.arange(n) if cls is None else torch.as_tensor(cls)
        for name, v in (("scores", scores), ("cls", cls)):
            if tuple(v.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},) (one per mask), got {tuple(v.shape)}")
        if records is not None and len(records) != n:
            raise ValueError(f"records must hold one dict per mask ({n}), got {len(records)}")

        data = torch.cat(
            [masks_to_boxes(self.masks.data), scores.to(dev, torch.float32)[:, None], cls.to(dev, torch.float32)[:, None]],
            1,
        )
        self.boxes = Boxes(data, (h, w))
        self.orig_img = orig_img
        self.orig_shape = (h, w)
        self.path = str(path)
        if names is None:
            names = {i: str(i) for i in range(n)}
        elif isinstance(names, (list, tuple)) and not all(isinstance(n, (list, tuple)) and len(n) == 2
                                                           for n in names):
            names = dict(enumerate(names))  # ["car", "bus"] → {0: "car", 1: "bus"}; [(0, "car")] as before
        self.names = dict(names)
        self.speed = {"preprocess": None, "inference": None, "postprocess": None, **(speed or {})}
        self.low_res_logits = low_res_logits if low_res_logits is None or callable(low_res_logits) else (
            torch.as_tensor(low_res_logits))
        self.records = list(records) if records is not None else None

    @property
    def low_res_logits(self) -> torch.Tensor | None:
        """``(N, s, s)`` low-res logits, or None; a prediction may make them when first read."""
        if callable(self._low_res):
            self.low_res_logits = self._low_res()
        return self._low_res

    @low_res_logits.setter
    def low_res_logits(self, value: ArrayLike | Callable[[], ArrayLike] | None) -> None:
        """Logits, or a function that makes them on first use (checked then)."""
        if value is not None and not callable(value):
            shape = tuple(np.shape(value))
            if len(shape) != 3 or shape[0] != len(self.masks):
                raise ValueError(f"low_res_logits must be ({len(self.masks)}, s, s), got {shape}")
        self._low_res = value

    def _readable_logits(self) -> torch.Tensor | Callable[[], ArrayLike] | None:
        """The low-res logits, made if they were deferred; where they can no longer be made (the
        model's weights changed since), a stand-in that raises that error when read, so that
        copies and selections of the masks still work."""
        try:
            return self.low_res_logits
        except WeightsChangedError as e:
            return refused(e)

    # --- container behaviour -------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Pickled with the low-res logits made, not the function that makes them (None where
        they can no longer be made: the model's weights changed since)."""
        logits = self._readable_logits()
        return {**self.__dict__, "_low_res": None if callable(logits) else logits}

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, idx: Any) -> Results:
        """Index, slice, list or bool array → a Results holding those masks (an int keeps N=1)."""
        sel = index_positions(idx, len(self))
        logits = self._readable_logits()
        return self._new(
            self.masks[sel],
            self.boxes[sel],
            logits if logits is None or callable(logits) else take(logits, sel),
            None if self.records is None else [self.records[i] for i in sel],
        )

    def new(self) -> Results:
        """A Results of the same image, path, names and speed with no masks (Ultralytics' ``new()``)."""
        return Results(self.orig_img, self.path, None, names=self.names, speed=self.speed)

    def _new(self, masks: Masks, boxes: Boxes, low_res: ArrayLike | None, records: list | None) -> Results:
        out = Results.__new__(Results)
        out.__dict__.update(self.__dict__)
        out.names, out.speed = dict(self.names), dict(self.speed)
        out.masks, out.boxes, out.records = masks, boxes, records
        out.low_res_logits = low_res
        return out

    def _apply(self, how: str, device: Any = None) -> Results:
        masks = {"cpu": self.masks.cpu, "numpy": self.masks.numpy}.get(how, lambda: self.masks.to(device))()
        boxes = {"cpu": self.boxes.cpu, "numpy": self.boxes.numpy}.get(how, lambda: self.boxes.to(device))()
        logits = self._readable_logits()
        return self._new(masks, boxes, logits if callable(logits) else convert(logits, how, device), self.records)

    def cpu(self) -> Results:
        """A copy with every tensor on the CPU."""
        return self._apply("cpu")

    def numpy(self) -> Results:
        """A copy with every tensor as a numpy array."""
        return self._apply("numpy")

    def to(self, device: Any) -> Results:
        """A copy with every tensor on ``device``."""
        return self._apply("to", device)

    def cuda(self) -> Results:
        return self.to("cuda")

    def name_of(self, c: int) -> str:
        """Name of class ``c`` (its number as text when ``names`` lacks it)."""
        return str(self.names.get(int(c), int(c)))

    # --- reporting -----------------------------------------------------------------------

    def verbose(self) -> str:
        """Short description: ``"3 masks"``, ``"1 mask"`` or ``"0 masks"``."""
        n = len(self)
        return f"{n} mask{'' if n == 1 else 's'}"

    def __repr__(self) -> str:
        h, w = self.orig_shape
        return f"Results({self.verbose()}, orig_shape=({h}, {w}), path={self.path!r})"

    def summary(self, normalize: bool = False, decimals: int = 5) -> list[dict[str, Any]]:
        """One dict per mask: ``name``, ``class``, ``confidence``, ``box`` and ``segments``."""
        return export.summary(self, normalize=normalize, decimals=decimals)

    def to_json(self, normalize: bool = False, decimals: int = 5) -> str:
        """:meth:`summary` as a JSON string."""
        return export.to_json(self, normalize=normalize, decimals=decimals)

    def to_coco(self, image_id: int = 0, category_id: int | None = None, start_id: int = 1) -> list[dict[str, Any]]:
        """COCO annotations with RLE ``segmentation`` (see :func:`segany.engine.export.to_coco`)."""
        return export.to_coco(self, image_id=image_id, category_id=category_id, start_id=start_id)

    # --- drawing and files ---------------------------------------------------------------

    def plot(
        self,
        labels: bool = True,
        boxes: bool = True,
        masks: bool = True,
        conf: bool = True,
        line_width: int | None = None,
        alpha: float = 0.5,
        font_size: float | None = None,
        img: np.ndarray | None = None,
        save: bool = False,
        filename: str | Path | None = None,
    ) -> np.ndarray:
        """The annotated image, ``(H, W, 3)`` uint8 BGR (see :func:`segany.engine.plotting.plot`):
        on ``img`` (BGR, the original's size) instead of the original when given; also written to
        ``filename`` (as :meth:`save` does) with ``save=True`` or a ``filename`` (Ultralytics' form)."""
        out = plotting.plot(self, labels=labels, boxes=boxes, masks=masks, conf=conf, line_width=line_width,
                            alpha=alpha, font_size=font_size, img=img)
        if save or filename is not None:
            self._write_image(out, filename)
        return out

    def save(self, filename: str | Path | None = None, **plot_args: Any) -> str:
        """Write :meth:`plot` to ``filename`` (default ``results_<image name>``; a folder, existing
        or ending in ``/``: that name inside it), atomically. The format follows the extension
        (``.jpg`` when there is none). Returns the path."""
        return self._write_image(self.plot(**plot_args), filename)

    def _write_image(self, image: np.ndarray, filename: str | Path | None) -> str:
        import cv2

        from .saving import image_file_name

        default = "results_{}{}".format(*image_file_name(self.path))
        if filename is None:
            filename = Path(default)
        elif str(filename).endswith(("/", os.sep)) or Path(filename).is_dir():
            filename = Path(filename) / default
        filename = Path(filename)
        if not filename.suffix:
            filename = filename.with_suffix(".jpg")
        try:
            ok, buf = cv2.imencode(filename.suffix, image)
        except cv2.error as e:
            raise ValueError(f"cannot save an image as {filename.suffix!r} ({filename}); use .jpg or .png") from e
        if not ok:
            raise ValueError(f"OpenCV could not encode the plot as {filename.suffix!r} ({filename})")
        export.atomic_write_bytes(filename, buf.tobytes())
        return str(filename)

    def save_txt(self, txt_file: str | Path, save_conf: bool = False) -> str:
        """Write YOLO-seg labels ``cls x1 y1 x2 y2 ... [conf]`` (normalised, 6 decimals), one line
        per mask whose polygon has at least 3 vertices. The whole file is written atomically and
        replaces any old one (no appending); no masks → an empty file. Returns the path."""
        example = f"{Path(self.path).stem or 'labels'}.txt"
        if str(txt_file).endswith(("/", os.sep)):  # Path() would drop the slash and write a file
            raise IsADirectoryError(f"{txt_file} is a folder: give a file name to write to "
                                    f"(e.g. {Path(txt_file) / example})")
        lines = export.yolo_lines(self, save_conf=save_conf)
        export.atomic_write_text(txt_file, "".join(line + "\n" for line in lines), example)
        return str(txt_file)
