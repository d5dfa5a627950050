"""Run folders: ``save=True`` / ``save_txt=True`` of a prediction, from Python and from the shell.

Each result is written as it arrives: the annotated image and a JSON of its masks (COCO RLE) for
``save``, YOLO-seg labels in ``labels/`` for ``save_txt``. Files are written atomically, and the
folder is made only when the first result is written, so a call that fails first (a bad prompt,
an unreadable image, a missing checkpoint) leaves no empty run folder behind.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .export import atomic_write_text

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
    video_frame = re.fullmatch(r"(.*):frame_(\d+)", path)  # (a file named x:frame_1.png is no frame)
    base, frame = video_frame.groups() if video_frame else (path, "")
    name = source_name(base) or "image"
    suffix = Path(name).suffix.lower()
    stem = Path(name).stem + (f"_frame_{frame}" if frame else "")
    stem = re.sub(r"[^\w.-]", "_", stem) or "image"
    return stem, (suffix if suffix in SAVE_SUFFIXES and not frame else ".jpg")


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


class RunWriter:
    """Writes the results of one prediction run into ``folder`` (see the module docstring)."""

    def __init__(self, project: str | None = None, name: str | None = None, exist_ok: bool = False,
                 save: bool = True, save_txt: bool = False, save_conf: bool = False) -> None:
        self.project, self.name, self.exist_ok = project, name, exist_ok
        self.folder = run_dir(project, name, exist_ok)  # the name it will get, unless taken meanwhile
        check_writable(self.folder)
        self.save, self.save_txt, self.save_conf = save, save_txt, save_conf
        self.written = 0
        self._made = False  # the folder: made at the first write
        self._stems: set[str] = set()

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> RunWriter | None:
        """A writer for prediction options that ask for files (``save``/``save_txt``), else None."""
        if not (opts["save"] or opts["save_txt"]):
            return None
        return cls(opts["project"], opts["name"], bool(opts["exist_ok"]), bool(opts["save"]),
                   bool(opts["save_txt"]), bool(opts["save_conf"]))

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
        stem, suffix = self._stem(r.path)
        if self.save:
            r.save(self.folder / f"{stem}{suffix}")
            h, w = r.orig_shape
            record = dict(image=dict(file_name=Path(r.path).name, path=r.path, height=h, width=w),
                          speed=speed_ms if speed_ms is not None else dict(r.speed),
                          annotations=r.to_coco(image_id=self.written))
            atomic_write_text(self.folder / f"{stem}.json", json.dumps(record))
        if self.save_txt:
            r.save_txt(self.folder / "labels" / f"{stem}.txt", save_conf=self.save_conf)
        self.written += 1

    def passing(self, results: Iterator[Results], verbose: bool = False) -> Iterator[Results]:
        """``results``, each written as it passes; with ``verbose``, where they went is printed
        after the last."""
        for r in results:
            self.write(r)
            yield r
        if verbose and self.written:
            print(self.summary())

    def summary(self) -> str:
        if not self.written:
            return "Nothing written: no result to save"
        what = [w for w, on in (("images and mask JSON", self.save), ("labels in labels/", self.save_txt)) if on]
        return f"Results saved to {self.folder} ({', '.join(what)})"

    def _stem(self, path: str) -> tuple[str, str]:
        """A file name stem and image suffix for one result, unique within the run."""
        stem, suffix = image_file_name(path)
        unique = stem
        for k in count(2):
            if unique not in self._stems:
                break
            unique = f"{stem}_{k}"
        self._stems.add(unique)
        return unique, suffix
