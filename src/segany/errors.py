"""The exceptions segany raises for bad input. Each message names the problem and the fix.

Every class derives from :class:`SegAnyError` and from the built-in exception a Python user
would expect (``FileNotFoundError``, ``ValueError``, ...), so both kinds of ``except`` work.
"""

from __future__ import annotations

import os
import re
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside segany, the user's line, whatever
    the path through the package to here (Python 3.12's ``skip_file_prefixes``, on 3.10 too)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def short_reason(e: BaseException, sentence: bool = False) -> str:
    """An exception's first line (``sentence``: its first sentence, where torch goes on with advice
    for other cases), for a message; its type when it has none."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    first = text.splitlines()[0]
    return (re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0] if sentence else first)[:200]


class SegAnyError(Exception):
    """Base class of all segany errors."""


class CheckpointError(SegAnyError, ValueError):
    """A checkpoint file cannot be used (base class of the checkpoint errors)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The named checkpoint is neither a file, nor in the weights cache, nor a known model name."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged or not a PyTorch checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """The file is a pickle that needs to run code to load; it is refused and the code never runs."""


class UnknownArchitectureError(CheckpointError):
    """The tensors in the file match no architecture segany knows."""


class StateDictMismatchError(CheckpointError):
    """The file's keys or shapes do not match the recognised architecture (missing/unexpected keys)."""


class DownloadError(SegAnyError, OSError):
    """Weights could not be downloaded (offline, HTTP error, truncated or corrupt file)."""


class PromptError(SegAnyError, ValueError):
    """Prompts of the wrong shape, values or combination."""


class ImageError(SegAnyError, ValueError):
    """An image source that cannot be read (missing, empty, corrupt or of an unsupported type)."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image path that does not exist, or a directory/glob that holds no images."""


class ConfigError(SegAnyError, ValueError):
    """An unknown option or an invalid option value."""


class DatasetNotFoundError(ConfigError, FileNotFoundError):
    """``data=`` names no dataset segany can read (COCO JSON, YOLO-seg folder, ``synthetic:N``)."""


class NotAvailableError(SegAnyError, NotImplementedError):
    """A feature that this version of segany does not provide yet."""


class MissingDependencyError(SegAnyError, ImportError):
    """An optional package that a feature needs is not installed."""


class ServeError(SegAnyError, OSError):
    """The web service cannot listen on its address (the port is taken, the host is not this machine's)."""


class BoxSourceError(SegAnyError, ValueError):
    """The boxes of one image cannot be read (malformed label line, size mismatch, ...)."""


class WeightsChangedError(SegAnyError, RuntimeError):
    """Something made from a model's weights was asked for after they changed (deferred logits)."""


class SkippedImageWarning(UserWarning):
    """A file listed by a directory or glob source could not be read and was skipped."""
