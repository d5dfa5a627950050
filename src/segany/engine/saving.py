"""Run folders: ``save=True`` / ``save_txt=True`` of a prediction, from Python and from the shell.

Each result is written as it arrives: the annotated image and a JSON of its masks (COCO RLE) for
``save``, YOLO-seg labels in ``labels/`` for ``save_txt``. The frames of a video source go into one
annotated video (``clip.mp4``, as Ultralytics writes it) instead of an image each; their JSON and
labels are per frame (``clip_frame_3.json``). Files are written atomically (a video under a
temporary name until its last frame), and the folder is made only when the first result is
written, so a call that fails first (a bad prompt, an unreadable image, a missing checkpoint)
leaves no empty run folder behind.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .export import atomic_write_text
from .sources import frame_rate, video_of

if TYPE_CHECKING:
    from .results import Results

SAVE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def source_name(path: str) -> str:
    """The file name of an image source: a URL's last path part, decoded (``%C3%BC.png`` → ``ü.png``)
    and without its query, else its host name."""
    if "://" in path:
        url = urllib.parse.urlsplit(path)
        return Path(urllib.parse.unquote(url.path)).name or url.hostname or ""
    return Path(path).name


def image_file_name(path: str) -> tuple[str, str]:
    """A file name stem and image suffix for the plot of a result whose image is ``path``:
    ``bus.jpg`` → ``("bus", ".jpg")``, ``clip.mp4:frame_3`` → ``("clip_frame_3", ".jpg")``,
    a URL's query and characters a file name should not hold are left out."""
    video = video_of(path)
    name = source_name(video[0] if video else path) or "image"
    suffix = Path(name).suffix.lower()
    stem = Path(name).stem + (f"_frame_{video[1]}" if video else "")
    stem = re.sub(r"[^\w.-]", "_", stem) or "image"
    return stem, (suffix if suffix in SAVE_SUFFIXES and not video else ".jpg")


def run_dir(project: str | None, name: str | None, exist_ok: bool) -> Path:
    """``<project>/<name>``, numbered ``name2``, ``name3``, ... when it exists (unless ``exist_ok``)."""
    base = Path(project or "runs/segment").expanduser() / (name or "predict")
    if exist_ok or not base.exists():
        return base
    return next(p for k in count(2) if not (p := base.with_name(f"{base.name}{k}")).exists())


def check_writable(folder: Path) -> None:
    """Fail before any work when ``folder`` cannot be created or written."""
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"cannot write results to {folder}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write results to {folder}: no write permission on {p}")


class VideoWriter:
    """One annotated video: frames appended as they come, written under a temporary name and
    renamed into place by :meth:`close` (a run cut short still leaves a playable file)."""

    def __init__(self, path: Path, source: str, vid_stride: int = 1) -> None:
        self.path, self.frames = path, 0
        self._tmp = path.with_name(f".{path.stem}.part{path.suffix}")
        fps = frame_rate(source) or 0.0
        self.fps = (fps if 0 < fps < 1000 else 30.0) / max(int(vid_stride), 1)
        self._writer = None

    def add(self, frame) -> None:
        """Append ``frame`` (BGR)."""
        import cv2

        if self._writer is None:
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not writer.isOpened():  # kept off self._writer: close() would rename a file never made
                writer.release()
                raise ConfigError(f"cannot write video {self.path}: OpenCV could not open an mp4v encoder")
            self._writer = writer
        self._writer.write(frame)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            os.replace(self._tmp, self.path)


@dataclass
class _Clip:
    """The video whose frames are arriving: its source, the stem of its files (``clip``, or
    ``clip_2`` for a second video of that name), the source's number of its last frame so far, and
    its annotated video (``save`` only)."""

    source: str
    stem: str
    last_frame: int = -1
    writer: VideoWriter | None = None


class RunWriter:
    """Writes the results of one prediction run into ``folder`` (see the module docstring)."""

    def __init__(self, project: str | None = None, name: str | None = None, exist_ok: bool = False,
                 save: bool = True, save_txt: bool = False, save_conf: bool = False, vid_stride: int = 1) -> None:
        self.project, self.name, self.exist_ok = project, name, exist_ok
        self.folder = run_dir(project, name, exist_ok)  # the name it will get, unless taken meanwhile
        check_writable(self.folder)
        self.save, self.save_txt, self.save_conf = save, save_txt, save_conf
        self.vid_stride = vid_stride
        self.written = 0
        self.videos: list[Path] = []  # annotated videos written
        self._clip: _Clip | None = None  # the video whose frames are arriving
        self._made = False  # the folder: made at the first write
        self._stems: set[str] = set()  # of images and their JSON and labels
        self._video_stems: set[str] = set()  # of videos: clip.mp4 and clip.jpg do not collide

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> RunWriter | None:
        """A writer for prediction options that ask for files (``save``/``save_txt``), else None."""
        if not (opts["save"] or opts["save_txt"]):
            return None
        return cls(opts["project"], opts["name"], bool(opts["exist_ok"]), bool(opts["save"]),
                   bool(opts["save_txt"]), bool(opts["save_conf"]), int(opts.get("vid_stride") or 1))

    def _make_folder(self) -> None:
        """Make the run folder at the first write. Without ``exist_ok`` it is claimed by an
        exclusive ``mkdir``: a run that took the name meanwhile (another call or process)
        makes this one move on to the next number instead of sharing, and overwriting, a folder."""
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=self.exist_ok)
                return
            except FileExistsError:
                if not self.folder.is_dir():
                    raise
                self.folder = run_dir(self.project, self.name, False)

    def write(self, r, speed_ms: dict[str, float] | None = None) -> None:
        """Write one result (``speed_ms`` goes into its JSON; default ``r.speed``)."""
        try:
            if not self._made:
                self._make_folder()
                self._made = True
            if self.save_txt:
                (self.folder / "labels").mkdir(exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create output folder {self.folder}: {e.strerror or e}") from None
        video = video_of(r.path)
        # A result of another source, or the same video from its start again (a list naming it
        # twice): the video before is complete.
        if self._clip is not None and (video is None or video[0] != self._clip.source
                                       or video[1] <= self._clip.last_frame):
            self.close()
        if video is None:
            stem, suffix = self._stem(r.path)
            if self.save:
                r.save(self.folder / f"{stem}{suffix}")
        else:
            if self._clip is None:
                clip_stem = self._stem(video[0], self._video_stems)[0]
                writer = VideoWriter(self.folder / f"{clip_stem}.mp4", video[0], self.vid_stride) if self.save else None
                self._clip = _Clip(video[0], clip_stem, writer=writer)
            self._clip.last_frame = video[1]
            stem = self._unique(f"{self._clip.stem}_frame_{video[1]}")  # its JSON and labels
            if self._clip.writer is not None:
                self._clip.writer.add(r.plot())
        if self.save:
            h, w = r.orig_shape
            record = dict(image=dict(file_name=source_name(r.path), path=r.path, height=h, width=w),
                          speed=speed_ms if speed_ms is not None else dict(r.speed),
                          annotations=r.to_coco(image_id=self.written))
            atomic_write_text(self.folder / f"{stem}.json", json.dumps(record))
        if self.save_txt:
            r.save_txt(self.folder / "labels" / f"{stem}.txt", save_conf=self.save_conf)
        self.written += 1

    def passing(self, results: Iterator[Results], verbose: bool = False) -> Iterator[Results]:
        """``results``, each written as it passes; with ``verbose``, where they went is printed
        after the last."""
        try:
            for r in results:
                self.write(r)
                yield r
        finally:
            self.close()
        if verbose and self.written:
            print(self.summary())

    def close(self) -> None:
        """Finish the video being written, if any (each video is finished when a result of
        another source arrives, and at the end of the run)."""
        if self._clip is not None:
            writer, self._clip = self._clip.writer, None
            if writer is not None:
                writer.close()
                if writer.frames:  # not one whose encoder failed to open
                    self.videos.append(writer.path)

    def summary(self) -> str:
        if not self.written:
            return "Nothing written: no result to save"
        saved = "images, videos and mask JSON" if self.videos else "images and mask JSON"
        what = [w for w, on in ((saved, self.save), ("labels in labels/", self.save_txt)) if on]
        return f"Results saved to {self.folder} ({', '.join(what)})"

    def _stem(self, path: str, taken: set[str] | None = None) -> tuple[str, str]:
        """A file name stem and image suffix for one result, unique within the run (among the
        stems ``taken``, default those of images)."""
        stem, suffix = image_file_name(path)
        return self._unique(stem, taken), suffix

    def _unique(self, stem: str, taken: set[str] | None = None) -> str:
        """``stem``, or ``stem_2``, ``stem_3``, ... the first not ``taken`` (default: the stems of
        images), which it then is."""
        taken = self._stems if taken is None else taken
        unique = stem
        for k in count(2):
            if unique not in taken:
                break
            unique = f"{stem}_{k}"
        taken.add(unique)
        return unique
