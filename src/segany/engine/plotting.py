"""Drawing :class:`~segany.engine.results.Results` onto their image with OpenCV."""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .export import to_numpy

if TYPE_CHECKING:
    from .results import Results

# Ultralytics' default palette (RGB hex), so plots look familiar; stored as BGR for OpenCV.
_HEX = (
    "042AFF", "0BDBEB", "F3F3F3", "00DFB7", "111F68", "FF6FDD", "FF444F", "CCED00", "00F344", "BD00FF",
    "00B4FF", "DD00BA", "00FFFF", "26C000", "01FFB3", "7D24FF", "7B0068", "FF1B6C", "FC6D2F", "A2FF0B",
)
PALETTE_BGR: tuple[tuple[int, int, int], ...] = tuple(
    (int(h[4:6], 16), int(h[2:4], 16), int(h[0:2], 16)) for h in _HEX
)


def color(i: int) -> tuple[int, int, int]:
    """BGR colour number ``i``: the fixed palette, then hues spread by the golden ratio with
    varying saturation and value, so that segment-everything's hundreds of masks stay apart."""
    i = int(i)
    if 0 <= i < len(PALETTE_BGR):
        return PALETTE_BGR[i]
    hue = (i * 0.6180339887498949) % 1.0
    sat = 0.5 + 0.5 * ((i * 0.7548776662466927) % 1.0)
    val = 0.65 + 0.35 * ((i * 0.5698402909980532) % 1.0)
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return round(b * 255), round(g * 255), round(r * 255)


def as_bgr(img: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 → a new ``(H, W, 3)`` BGR copy."""
    img = np.asarray(img)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise ValueError(f"cannot draw on an image of shape {img.shape}: give an (H, W, 3) BGR image")
    if img.dtype != np.uint8:  # a cast would silently darken a 0..1 float image or wrap 16-bit values
        raise ValueError(f"cannot draw on a {img.dtype} image: give a uint8 (0..255) BGR image")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(np.ascontiguousarray(img.reshape(img.shape[:2])), cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(img, dtype=np.uint8).copy()


def plot(
    results: Results,
    labels: bool = True,
    boxes: bool = True,
    masks: bool = True,
    conf: bool = True,
    line_width: int | None = None,
    alpha: float = 0.5,
    font_size: float | None = None,
    img: np.ndarray | None = None,
) -> np.ndarray:
    """Masks, outlines, boxes and labels drawn on a copy of ``orig_img`` (or of ``img``, an image
    of the same size) → ``(H, W, 3)`` uint8 BGR. ``font_size``: label text height in pixels
    (default from the line width).

    Mask ``i`` gets palette colour ``i`` (every mask its own colour, whatever its class). Masks
    are blended largest first so small masks stay visible on top of big ones. Labels
    (``name conf``) are drawn with the boxes, as in Ultralytics: ``boxes=False`` hides both.
    The original image is never modified.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha}: the masks' opacity is from 0 (invisible) to 1 (opaque)")
    # None or 0: automatic, as in Ultralytics. OpenCV reads a negative thickness as "fill", so
    # line_width=-1 would paint solid boxes over the image.
    if line_width and not round(float(line_width)) >= 1:
        raise ValueError(f"line_width={line_width}: give a width of 1 pixel or more (None: from the image size)")
    if font_size and not float(font_size) > 0:
        raise ValueError(f"font_size={font_size}: give a text height above 0 pixels (None: from the line width)")
    img = as_bgr(results.orig_img if img is None else img)
    h, w = img.shape[:2]
    if (h, w) != tuple(results.orig_shape):
        raise ValueError(f"img is {w}x{h} but the masks are {results.orig_shape[1]}x{results.orig_shape[0]}: "
                         "draw on an image of the original size")
    lw = round(float(line_width)) if line_width else max(round((h + w) / 2 * 0.003), 2)
    n = len(results)
    if n == 0:
        return img
    data = to_numpy(results.masks.data)
    xyxy = to_numpy(results.boxes.xyxy)
    scores = to_numpy(results.boxes.conf)
    cls = to_numpy(results.boxes.cls)
    areas = data.reshape(n, -1).sum(1)

    if masks:
        for i in np.argsort(-areas, kind="stable"):
            if areas[i] == 0:
                continue
            # Blend inside the mask's box only: per-mask work scales with its size, not the image's.
            x1, y1, x2, y2 = (int(v) for v in xyxy[i])
            m, roi = data[i, y1:y2, x1:x2], img[y1:y2, x1:x2]
            c = np.array(color(i), np.float32)
            roi[m] = (roi[m].astype(np.float32) * (1.0 - alpha) + c * alpha).round().astype(np.uint8)
            outline = [p.round().astype(np.int32).reshape(-1, 1, 2) for p in results.masks.contours(int(i))]
            cv2.drawContours(img, outline, -1, color(i), max(lw // 2, 1), cv2.LINE_AA)

    if boxes:
        # Last mask first, as Ultralytics draws, so where labels overlap (boxes sharing a corner)
        # the first mask's (the first prompt's, the best candidate's) stays readable on top.
        for i in reversed(range(n)):
            if areas[i] == 0:  # an empty mask has no box to draw
                continue
            # Pixel-edge box → inclusive pixel corners for cv2.rectangle.
            x1, y1, x2, y2 = (round(float(v)) for v in xyxy[i])
            p1, p2 = (x1, y1), (max(x2 - 1, x1), max(y2 - 1, y1))
            cv2.rectangle(img, p1, p2, color(i), lw, cv2.LINE_AA)
            if labels:
                name = results.name_of(int(cls[i]))
                text = f"{name} {float(scores[i]):.2f}" if conf else name
                _label(img, text, p1, color(i), lw, font_size)
    return img


def _label(img: np.ndarray, text: str, p1: tuple[int, int], bg: tuple[int, int, int], lw: int,
           font_size: float | None = None) -> None:
    """Filled label box with ``text`` above ``p1`` (inside the box when there is no room above)."""
    w = img.shape[1]
    tf = max(lw - 1, 1)  # font thickness
    # Font scale; Hershey simplex capitals are ~22 px tall at scale 1.
    sf = font_size / 22 if font_size else lw / 3
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, sf, tf)
    x = min(p1[0], max(w - tw, 0))
    outside = p1[1] - th - 3 >= 0
    y_top, y_bot = (p1[1] - th - 3, p1[1]) if outside else (p1[1], p1[1] + th + 3)
    cv2.rectangle(img, (x, y_top), (x + tw, y_bot), bg, -1, cv2.LINE_AA)
    # Dark text on light colours, white text on dark ones.
    luma = 0.114 * bg[0] + 0.587 * bg[1] + 0.299 * bg[2]
    fg = (0, 0, 0) if luma > 150 else (255, 255, 255)
    cv2.putText(img, text, (x, y_bot - 2), cv2.FONT_HERSHEY_SIMPLEX, sf, fg, tf, cv2.LINE_AA)
