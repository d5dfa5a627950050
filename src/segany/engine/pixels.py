"""Pixels of one image → H×W×3 uint8 BGR (OpenCV's convention), for :mod:`segany.engine.sources`:
numpy arrays, ``PIL.Image``, tensors and encoded file bytes. The value rules (16-bit: the high byte,
float 0..1, refusals instead of guesses) are listed in that module's docstring."""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from segany.errors import ImageError

ARRAY_LAYOUTS = (
    "expected a numpy image H×W×3 BGR (as cv2.imread returns), H×W grayscale, H×W×1, or "
    "H×W×4 BGRA (alpha dropped), of dtype uint8 (0..255), uint16 (0..65535), float (0..1) or bool (0 or 255)"
)
TENSOR_LAYOUTS = (
    "expected a torch.Tensor of shape (3,H,W) or (1,3,H,W) (a batch (B,3,H,W) as the source of a prediction), "
    "RGB channel order, float in 0..1 or uint8 in 0..255"
)
_OPENCV_LOG_LOCK = threading.Lock()


def _to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """Bring any supported dtype to uint8, refusing value ranges that would need a guess."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16 or (a.dtype.kind == "u" and a.dtype.itemsize == 2):
        # The high byte, as cv2.imread and Pillow turn 16-bit files into 8-bit ones: a file and
        # its pixels as an array give one image, and the image a Meta SamPredictor user gets.
        return (a >> 8).astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ImageError(f"{what}: float image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ImageError(
                f"{what}: float image values must lie in 0..1 (got min {lo:g}, max {hi:g}); "
                "divide 0..255 data by 255 or convert it to uint8"
            )
        return np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if a.dtype.kind in "iu":
        if a.min() >= 0 and a.max() <= 255:  # e.g. int64 arrays built from Python ints
            return a.astype(np.uint8)
        raise ImageError(
            f"{what}: integer image of dtype {a.dtype} has values outside 0..255 "
            f"(min {a.min()}, max {a.max()}); {ARRAY_LAYOUTS}"
        )
    raise ImageError(f"{what}: unsupported dtype {a.dtype}; {ARRAY_LAYOUTS}")


def array_to_bgr(a: np.ndarray, what: str = "numpy array") -> np.ndarray:
    """Channels-last array in BGR(A) or grayscale → contiguous H×W×3 uint8 BGR."""
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4):
        hint = ""
        if a.shape[0] in (1, 3, 4):
            hint = "; it looks channels-first (C,H,W): use arr.transpose(1, 2, 0)"
        raise ImageError(f"{what}: got shape {tuple(a.shape)}{hint}; {ARRAY_LAYOUTS}")
    if a.ndim not in (2, 3):
        batch = "; for a batch (B,H,W,C) use iter_sources()" if a.ndim == 4 else ""
        raise ImageError(f"{what}: got shape {tuple(a.shape)}{batch}; {ARRAY_LAYOUTS}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{what}: empty image of shape {tuple(a.shape)}")
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]  # BGRA: drop alpha
    elif a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    a = _to_uint8(a, what)
    if a.ndim == 2:
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(a)


class _PillowFailed(ImageError):
    """Pillow could not decode the pixels (as opposed to segany refusing their values)."""


def pil_to_bgr(im: Image.Image, what: str = "PIL image") -> np.ndarray:
    """Any Pillow mode → H×W×3 uint8 BGR."""
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{what}: empty image of size {im.width}x{im.height}")
    try:
        mode = im.mode
        if mode.startswith("I;16"):
            return array_to_bgr(np.asarray(im).astype(np.uint16), what)
        if mode == "I":
            # 32-bit int is how Pillow may hand over 16-bit files: 0..65535 is taken as 16-bit data
            a = np.asarray(im)
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise ImageError(f"{what}: 32-bit integer image with values {a.min()}..{a.max()}, outside the "
                                 "0..65535 of 16-bit data: convert it to 8 or 16 bits first")
            return array_to_bgr(a.astype(np.uint16), what)
        if mode == "F":
            return array_to_bgr(np.asarray(im), what)
        if mode == "La":
            im = im.convert("LA")  # premultiplied: Pillow converts La only to LA
        if im.mode in ("1", "L", "LA"):
            return array_to_bgr(np.asarray(im.convert("L")), what)
        if mode in ("P", "PA"):
            # palette transparency must go through RGBA or Pillow warns; alpha is dropped anyway
            rgba = mode == "PA" or "transparency" in im.info
            im = im.convert("RGBA" if rgba else "RGB")
        elif mode != "RGB" and mode != "RGBA":
            im = im.convert("RGB")  # CMYK, YCbCr, RGBX, LAB, ...
        return _rgb_to_bgr(im)
    except ImageError:
        raise
    except Exception as e:  # a lazily loaded PIL image can fail here on a damaged file
        raise _PillowFailed(f"{what}: Pillow could not read it ({type(e).__name__}: {e})") from e


def _rgb_to_bgr(im: Image.Image) -> np.ndarray:
    """An RGB or RGBA image → H×W×3 BGR, a band of ~4 MB at a time in Pillow's own BGR packing
    (alpha dropped). ``np.asarray`` of the whole image would hold the pixels twice besides the
    image (Pillow joins the chunks it encodes), and the swap of channels a third time: a
    48-megapixel photo decoded at +640 MB this way, at +340 MB by bands, in 25 % less time."""
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, (1 << 22) // (3 * w))
    for y in range(0, h, rows):
        band = im.crop((0, y, w, min(h, y + rows))) if rows < h else im
        out[y : y + band.height] = np.frombuffer(band.tobytes("raw", "BGR"), np.uint8).reshape(band.height, w, 3)
    return out


def tensor_to_bgr(t: torch.Tensor, what: str = "tensor") -> np.ndarray:
    """(3,H,W) / (1,3,H,W) RGB tensor (or 1-channel) → H×W×3 uint8 BGR."""
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    dtype_ok = t.is_floating_point() or t.dtype == torch.uint8
    if t.ndim != 3 or t.shape[0] not in (1, 3) or not dtype_ok:
        batch = f" (a batch of {t.shape[0]}: use iter_sources())" if t.ndim == 4 else ""
        raise ImageError(
            f"{what}: got shape {tuple(t.shape)}{batch}, dtype {t.dtype}; {TENSOR_LAYOUTS}"
        )
    t = t.detach().cpu()
    t = t.float() if t.is_floating_point() else t  # numpy has no bfloat16
    a = t.numpy().transpose(1, 2, 0)
    if a.shape[2] == 3:
        a = a[..., ::-1]  # RGB → BGR
    try:
        return array_to_bgr(a, what)
    except ImageError as e:
        raise ImageError(f"{e}; {TENSOR_LAYOUTS}") from None


def decode_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes: Pillow first, then OpenCV for what Pillow cannot read."""
    if not data:
        raise ImageError(f"{name} is empty (0 bytes), not a readable image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # a turned copy of the whole image otherwise
            return pil_to_bgr(im, name)
    except _PillowFailed as e:
        pil_error = e
    except ImageError:
        raise  # Pillow read it, and its values are refused (the message says why)
    except Image.DecompressionBombError as e:
        # Not handed to OpenCV: it would decode what Pillow's limit is there to refuse.
        raise ImageError(_bomb_message(name, e)) from None
    except Exception as e:
        pil_error = e
    buf = np.frombuffer(data, np.uint8)
    with _quiet_opencv():  # OpenCV logs its own failures on stderr; the ImageError below says it all
        raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if raw is not None and raw.dtype.kind == "f":  # PFM, HDR, float TIFF: IMREAD_COLOR would not scale them
            return array_to_bgr(raw, name)
        arr = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # applies EXIF too
    if arr is None or arr.size == 0:
        raise ImageError(
            f"{name} is not a readable image (neither Pillow nor OpenCV could decode it; "
            f"Pillow said: {re.sub(r' <_io.BytesIO object at 0x[0-9a-f]+>', '', str(pil_error))})"
        )
    return arr


def bomb_sizes(error: Exception) -> tuple[int, int] | None:
    """The image's pixels and Pillow's limit from a ``DecompressionBombError`` (Pillow refuses
    from the header, before decoding: "Image size (N pixels) exceeds limit of M pixels, ..."),
    or None for a message of another form."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(error))
    return (int(found[1]), int(found[2])) if found else None


def _bomb_message(name: str, error: Exception) -> str:
    """An image over Pillow's decompression-bomb limit: its size, the limit, and how to allow it."""
    sizes = bomb_sizes(error)
    what = (f"{sizes[0]:,} pixels, over Pillow's decompression-bomb limit of {sizes[1]:,}" if sizes
            else f"over Pillow's decompression-bomb limit ({error})")
    return (f"{name}: {what}; if you trust the file, allow it with "
            "PIL.Image.MAX_IMAGE_PIXELS = None (or a larger number) before the call")


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV's logging off for a block (restored after; a lock keeps threads from restoring
    each other's silence)."""
    logging = cv2.utils.logging
    with _OPENCV_LOG_LOCK:
        level = logging.getLogLevel()
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)
        try:
            yield
        finally:
            logging.setLogLevel(level)
