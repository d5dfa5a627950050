"""Image sources: whatever a user passes as ``source`` becomes H×W×3 uint8 BGR (OpenCV's
convention): paths, URLs, ``PIL.Image``, numpy arrays, tensors, directories, globs, videos, lists.
Choices worth knowing:

- Files are decoded with Pillow first (EXIF orientation honoured; 16-bit, grayscale, palette
  and RGBA files all handled), then with ``cv2.imdecode`` for formats Pillow cannot read.
  Multi-frame files (GIF, multi-page TIFF) give their first frame. In-memory images (PIL,
  arrays, tensors) are taken as their pixels are: a ``PIL.Image`` keeps its EXIF tag through
  ``rotate``/``convert``, so applying it here could turn an image twice (``ImageOps.exif_transpose``
  gives the displayed orientation).
- Alpha is dropped, not composited: the colour under a transparent pixel is kept as is.
- 16-bit data keeps its high byte (65535 → 255), as ``cv2.imread`` reads 16-bit files; float data must lie in 0..1 and is
  scaled by 255; other integer dtypes must hold 0..255. Anything else is refused with a
  message instead of being guessed at (Pillow "I" images are read as 16-bit data).
- URLs (http/https) are downloaded by :mod:`.urls` (a timeout per connect/read); one
  whose path ends in a video extension goes to a temporary file, read frame by frame, then removed.
- Tensors follow Ultralytics' layout: ``(3,H,W)``, ``(1,3,H,W)`` or a batch ``(B,3,H,W)``,
  **RGB**, float in 0..1 (uint8 0..255 also accepted).
- An ``H×W×3`` uint8 ndarray is copied: the results keep their image, and the caller's later
  edits of the array must not reach them.
- Directories give their image files (not videos, not hidden files), sorted by name,
  non-recursively; globs give image and video files, sorted. Video frames are named
  ``path:frame_N`` with N counted from 0 in the file (``vid_stride`` keeps every N-th frame).
- A file that a directory or glob lists but that cannot be read is skipped with a
  :class:`~segany.errors.SkippedImageWarning` (one bad file should not end a run over a
  folder); a file named on its own that cannot be read is an error.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from segany.errors import ConfigError, ImageError, ImageNotFoundError, SkippedImageWarning, warn

from .pixels import array_to_bgr, decode_bytes, pil_to_bgr, tensor_to_bgr
from .urls import download, is_url

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    ".avif .bmp .dib .gif .hdr .jp2 .jpe .jpeg .jpg .mpo .pbm .pfm .pgm .png .pnm .ppm .tga .tif "
    ".tiff .webp".split()
)
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    ".3gp .asf .avi .flv .m4v .mkv .mov .mp4 .mpeg .mpg .ts .webm .wmv".split()
)


def _suffix(s: str) -> str:
    return os.path.splitext(s)[1].lower()


def _is_video(s: str) -> bool:
    """Whether a path, or the path part of a URL (not its query), names a video file."""
    return _suffix(urllib.parse.urlsplit(s).path if is_url(s) else s) in VIDEO_EXTENSIONS


def _source_string(source: str | os.PathLike) -> str:
    """A path or URL as a string with ``~`` expanded; a blank string is refused (as a path it
    would be the working directory)."""
    s = os.fspath(source)
    if isinstance(s, str) and not s.strip():
        raise ImageError(f"the source {s!r} is an empty string: give an image path, URL, directory, glob or video")
    return os.path.expanduser(s)


# ---------------------------------------------------------------- files and URLs


# Where one image is read (set_image, load_image), what to do with a source of many.
ONE_IMAGE_ONLY = "one image is needed here (set_image); a prediction takes many: model(source) or predictor(source=...)"


def _load_path(s: str) -> np.ndarray:
    path = Path(s)
    if not path.exists():
        raise ImageNotFoundError(f"image file not found: {s}")
    if path.is_dir():
        raise ImageError(f"{s} is a directory, not one image: {ONE_IMAGE_ONLY}")
    if _is_video(s):
        raise ImageError(f"{s} is a video, not one image: {ONE_IMAGE_ONLY}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{s} could not be read: {e}") from e
    return decode_bytes(data, s)


def _load_url(url: str) -> np.ndarray:
    if _is_video(url):
        raise ImageError(f"{url} is a video, not one image: {ONE_IMAGE_ONLY}")
    buffer = io.BytesIO()
    download(url, buffer, "image")
    return decode_bytes(buffer.getvalue(), url)


def load_image(source: Any) -> np.ndarray:
    """Read one image as H×W×3 uint8 BGR.

    ``source``: a path (str or ``Path``; EXIF orientation applied), an http(s) URL, a
    ``PIL.Image`` (any mode, taken as its pixels are), a numpy array (BGR / grayscale / BGRA, uint8 / uint16 / float 0..1)
    or a ``torch.Tensor`` ((3,H,W) or (1,3,H,W), RGB, float 0..1 or uint8).
    Raises ``ImageNotFoundError`` for a missing path and ``ImageError`` for anything unreadable.
    """
    if isinstance(source, np.ndarray):
        image = array_to_bgr(source)
        # A copy when it would be the caller's own array: results and the predictor keep the
        # image, and a later edit of the array (drawing on a video frame) must not reach them.
        return image.copy() if np.may_share_memory(image, source) else image
    if isinstance(source, torch.Tensor):
        return tensor_to_bgr(source)
    if isinstance(source, Image.Image):
        return pil_to_bgr(source)
    if isinstance(source, (str, os.PathLike)):
        s = _source_string(source)
        return _load_url(s) if is_url(s) else _load_path(s)
    raise ImageError(
        f"unsupported image source of type {type(source).__name__}; expected a path, URL, "
        "PIL.Image, numpy array or torch.Tensor"
    )


# ---------------------------------------------------------------- many images


class _Listed(str):
    """A path found by listing a directory or matching a glob, not named by the caller."""


def _expand_path(s: str) -> Iterator[str]:
    """One path-like source → the image/video paths (or URL) it stands for; the paths a
    directory or glob lists are :class:`_Listed` (skipped when unreadable)."""
    if is_url(s):
        yield s
        return
    path = Path(s)
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            n_videos = sum(p.suffix.lower() in VIDEO_EXTENSIONS for p in entries)
            hint = f" ({n_videos} video file(s) found: pass them by name or glob)" * bool(n_videos)
            raise ImageNotFoundError(
                f"directory {s} holds no image files{hint}; looked for "
                + " ".join(sorted(IMAGE_EXTENSIONS))
            )
        yield from (_Listed(p) for p in images)
    elif path.exists():
        yield s
    elif any(c in s for c in "*?["):
        known = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
        matches = [m for m in sorted(glob.glob(s, recursive=True))
                   if _suffix(m) in known and os.path.isfile(m)]
        if not matches:
            raise ImageNotFoundError(f"glob pattern {s!r} matched no image or video files")
        yield from map(_Listed, matches)
    else:
        raise ImageNotFoundError(f"image source not found: {s}")


class ExpandedSources(list):
    """The items a source stands for, listed once (:func:`expand_once`): counted and then iterated
    without listing its directories and globs again."""


def expand_once(source: Any) -> Any:
    """``source`` with its directories, globs and lists expanded into one :class:`ExpandedSources`
    (paths, URLs and in-memory images, undecoded), for a caller that counts the images and then
    iterates over them. Any other iterable (a generator, a frame reader, a dataset) is returned as
    it is: expanding it would drain it and hold all its images at once, where iterating takes them
    one at a time. Missing paths raise here, as :func:`iter_sources` would."""
    if isinstance(source, ExpandedSources) or not _expandable(source):
        return source
    return ExpandedSources(_expand(source))


def _expandable(source: Any) -> bool:
    """Whether ``source`` is a path, an in-memory image, or a list or tuple of only these."""
    if isinstance(source, (list, tuple)):
        return all(_expandable(item) for item in source)
    return isinstance(source, (str, os.PathLike, np.ndarray, torch.Tensor, Image.Image))


def _expand(source: Any) -> Iterator[Any]:
    """Flatten lists/directories/globs into single items (paths, URLs or in-memory images)."""
    if isinstance(source, ExpandedSources):
        yield from source
    elif isinstance(source, (str, os.PathLike)):
        yield from _expand_path(_source_string(source))
    elif isinstance(source, (np.ndarray, torch.Tensor, Image.Image)):
        yield source
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray, Mapping)):
        empty = True
        for item in source:
            empty = False
            yield from _expand(item)
        if empty:
            raise ImageError("the source is an empty list: give at least one image")
    else:
        raise ImageError(
            f"unsupported image source of type {type(source).__name__}; expected a path, URL, "
            "directory, glob, video, PIL.Image, numpy array, torch.Tensor or a list of these"
        )


def expand_sources(source: Any) -> list[Any]:
    """The items ``source`` stands for, undecoded: paths/URLs (videos unexpanded) and in-memory
    images. Lets a caller decode each item itself and skip the bad ones (``auto_annotate``)."""
    return [str(item) if isinstance(item, _Listed) else item for item in _expand(source)]


def frame_name(video: str, index: int) -> str:
    """The name of frame ``index`` of ``video`` in a stream: ``clip.mp4:frame_3``."""
    return f"{video}:frame_{index}"


def video_of(name: str) -> tuple[str, int] | None:
    """``("clip.mp4", 3)`` for a frame's :func:`frame_name`, else None (a file named x:frame_1.png is no frame)."""
    frame = re.fullmatch(r"(.*):frame_(\d+)", name)
    return (frame[1], int(frame[2])) if frame else None


# Frame rates of the last video URLs read (their downloads are removed after), for an annotated
# video of one (saving.VideoWriter).
_URL_RATES: dict[str, float] = {}


def frame_rate(video: str) -> float | None:
    """Frames per second of a video file, or of a video URL read in this process; None if unknown."""
    if is_url(video):
        return _URL_RATES.get(video)
    cap = cv2.VideoCapture(video) if os.path.isfile(video) else None
    try:
        return cap.get(cv2.CAP_PROP_FPS) if cap is not None and cap.isOpened() else None
    finally:
        if cap is not None:
            cap.release()


def _iter_video(s: str, vid_stride: int, name: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Frames of the video file ``s``, named (and errors worded) after ``name`` (default ``s``)."""
    cap = cv2.VideoCapture(s)
    s = name or s
    try:
        if not cap.isOpened():
            raise ImageError(f"{s} is not a readable video (OpenCV could not open it)")
        if is_url(s):
            _URL_RATES.pop(s, None)  # (re)inserted last: the oldest go first
            _URL_RATES[s] = cap.get(cv2.CAP_PROP_FPS)
            for old in list(_URL_RATES)[:-64]:
                del _URL_RATES[old]
        index = kept = 0
        while True:
            if index % vid_stride == 0:
                ok, frame = cap.read()
            else:
                ok, frame = cap.grab(), None  # grab without decoding: skipped frames are cheap
            if not ok:
                break
            if frame is not None:
                kept += 1
                yield frame_name(s, index), array_to_bgr(frame, frame_name(s, index))
            index += 1
        if kept == 0:
            raise ImageError(f"{s} is not a readable video (no frame could be decoded)")
    finally:
        cap.release()


def _iter_video_url(url: str, vid_stride: int) -> Iterator[tuple[str, np.ndarray]]:
    """A video URL, downloaded to a temporary file (OpenCV reads files) that is removed after."""
    fd, tmp = tempfile.mkstemp(prefix="segany-", suffix=_suffix(urllib.parse.urlsplit(url).path))
    try:
        with os.fdopen(fd, "wb") as f:
            download(url, f, "video")
        yield from _iter_video(tmp, vid_stride, name=url)
    finally:
        os.unlink(tmp)


def _load_item(item: Any, vid_stride: int) -> Iterator[tuple[str | None, np.ndarray]]:
    """One expanded item → (name or None for in-memory images, BGR image) pairs."""
    if isinstance(item, str):
        if _is_video(item):
            yield from (_iter_video_url if is_url(item) else _iter_video)(item, vid_stride)
        else:
            yield item, load_image(item)
    elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
        for i in range(item.shape[0]):
            yield None, load_image(item[i])
    else:
        yield None, load_image(item)


def _check_stride(vid_stride: int) -> None:
    if type(vid_stride) is not int or vid_stride < 1:
        raise ConfigError(f"vid_stride must be a positive integer, got {vid_stride!r}")


def iter_sources(source: Any, vid_stride: int = 1, on_skip: Callable[[str], None] | None = None
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, BGR image)`` for every image ``source`` stands for, lazily and in order.

    ``source``: anything ``load_image`` takes, a directory, a glob, a video file or URL (frames named
    ``path:frame_N``), a batch tensor ``(B,3,H,W)`` / array ``(B,H,W,C)``, or a list of these.
    In-memory images are named ``image0``, ``image1``, ... by their position in the stream.
    A file that a directory or glob lists but that cannot be read is skipped with a
    :class:`SkippedImageWarning`, and passed to ``on_skip`` if given.
    """
    _check_stride(vid_stride)
    index = 0
    for item in _expand(source):
        try:
            for name, image in _load_item(item, vid_stride):
                yield (name if name is not None else f"image{index}"), image
                index += 1
        except ImageError as e:
            if not isinstance(item, _Listed):
                raise
            warn(f"skipped, unreadable: {e}", SkippedImageWarning)
            if on_skip is not None:
                on_skip(str(item))


def _video_frames(s: str, vid_stride: int) -> int | None:
    cap = cv2.VideoCapture(s)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    return -(-n // vid_stride) if n > 0 else None  # containers may not know: None


def count_sources(source: Any, vid_stride: int = 1) -> int | None:
    """Number of images ``iter_sources(source, vid_stride)`` will yield, when cheap to know
    (for progress bars); ``None`` for generators and videos whose length is unknown.
    Missing paths raise the same errors as ``iter_sources``."""
    _check_stride(vid_stride)
    if isinstance(source, Iterator):
        return None  # a generator cannot be counted without consuming it
    if isinstance(source, (list, tuple)) and source and not isinstance(source, ExpandedSources):
        counts = [count_sources(item, vid_stride) for item in source]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]
    total = 0
    for item in _expand(source):  # raises what iter_sources would: missing, empty, bad type
        if isinstance(item, str) and _is_video(item):
            n = None if is_url(item) else _video_frames(item, vid_stride)  # a URL: not downloaded to count
            if n is None:
                return None
            total += n
        else:
            total += int(item.shape[0]) if getattr(item, "ndim", 0) == 4 else 1
    return total
