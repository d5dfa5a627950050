"""The weights cache and the download of official checkpoints.

A model name resolves to a file in this order (SPEC §1): an existing path; the same file name in
the weights cache (``$SEGANY_WEIGHTS_DIR``, default ``~/.cache/segany``); a registry name or alias,
whose official file is looked up in the cache and downloaded there when absent.

Downloads stream to a temporary file beside the destination, are checked against the
``Content-Length``, the published size and SHA-256 where known, and the first bytes of a PyTorch
checkpoint, and only then are renamed into place, so a failed or interrupted download never leaves
a half-written checkpoint, or a web page in its place, behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import glob
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .errors import CheckpointNotFoundError, ConfigError, DownloadError
from .models.registry import MODELS, find_config

__all__ = ["weights_dir", "resolve_weights", "download_file", "same_checkpoint"]

ENV_VAR = "SEGANY_WEIGHTS_DIR"
DEFAULT_TIMEOUT = 60.0  # seconds without data before a stalled connection counts as failed
_CHUNK = 1 << 20
# How a PyTorch checkpoint starts: a zip archive (torch.save since 1.6) or a pickle (older files).
_CHECKPOINT_STARTS = (b"PK\x03\x04", b"\x80")
# A temporary download file left by a process that is gone (killed, power lost) and untouched
# this long is removed by the next download of the same file.
STALE_PART_SECONDS = 3600.0


def weights_dir() -> Path:
    """The weights cache folder: ``$SEGANY_WEIGHTS_DIR`` or ``~/.cache/segany``, created on demand."""
    env = os.environ.get(ENV_VAR, "").strip()
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "segany"
    path = path.absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"The weights cache folder {path} cannot be used ({exc.strerror or exc}). "
            f"Set ${ENV_VAR} to a folder you can write to, or pass the checkpoint's path."
        ) from exc
    return path


def _known_models() -> str:
    lines = []
    for cfg in MODELS.values():
        names = ", ".join(cfg.aliases) if cfg.aliases else ""
        lines.append(f"  {cfg.name}" + (f" ({names})" if names else ""))
    return "\n".join(lines)


def bundled_path(filename: str) -> Path:
    """A checkpoint shipped inside the package (``segany/assets``)."""
    path = Path(__file__).resolve().parent / "assets" / filename
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"The bundled checkpoint {filename!r} is missing from this installation ({path}). "
            "Reinstall segany (pip install --force-reinstall segany) or pass another model."
        )
    return path


def resolve_weights(model: str | os.PathLike, download: bool = True, progress: bool = True) -> Path:
    """The local checkpoint file for a path or model name, downloading official weights if needed.

    Raises :class:`CheckpointNotFoundError` when nothing matches (or ``download=False`` and the
    file is not cached) and :class:`DownloadError` when a download fails.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointNotFoundError(
            f"Checkpoint {str(model)!r} is a directory, not a file. "
            "Pass the path to the checkpoint file itself (e.g. 'weights/sam_b.pt')."
        )

    # Names are matched by their last component: the cache is flat, and a user who types
    # 'weights/sam_b.pt' for a file that is not there still means the sam_b model.
    name = path.name
    cache = weights_dir()
    cached = cache / name
    if name and cached.is_file():
        return cached

    cfg = find_config(name) if name else None
    if cfg is None:
        raise CheckpointNotFoundError(
            f"Checkpoint {str(model)!r} not found: it is not an existing file, not in the weights "
            f"cache ({cache}), and not a known model name.\n"
            f"Known models (name and the file names you may use):\n{_known_models()}\n"
            "To use your own checkpoint, pass its path, e.g. SAM('path/to/weights.pt'), "
            f"or copy it into {cache} (set ${ENV_VAR} to use another folder)."
        )
    if cfg.bundled:
        return bundled_path(cfg.bundled)
    if cfg.weights is None:
        target = cache / name
        raise CheckpointNotFoundError(
            f"Model {cfg.name!r} has no download source. Put its checkpoint at {target} "
            "or pass the checkpoint's path."
        )

    target = cache / cfg.weights.filename
    # The official file, or the same weights the user placed under another of the model's names.
    for candidate in (target, *(cache / alias for alias in cfg.aliases)):
        if candidate.is_file():
            return candidate
    if not download:
        raise CheckpointNotFoundError(
            f"Checkpoint for {cfg.name!r} is not in the weights cache and download=False. "
            f"Download {cfg.weights.url} and put it at:\n  {target}\n"
            "or pass download=True, or pass the checkpoint's path."
        )
    return download_file(cfg.weights.url, target, cfg.weights.sha256, progress=progress, size=cfg.weights.size)


def same_checkpoint(name: str | os.PathLike, path: str | os.PathLike | None) -> bool:
    """Whether the checkpoint ``name`` (a name or path, as typed) resolves to the file ``path``,
    without downloading anything."""
    if path is None:
        return False
    try:
        return resolve_weights(name, download=False).resolve() == Path(path).resolve()
    except (CheckpointNotFoundError, ConfigError, OSError):
        return False


def _reason(exc: BaseException, timeout: float) -> str:
    """A short human reason for a failed download."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return f"timed out after {timeout:g} s"
        return f"{reason} (are you offline?)"
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s without data"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed early (got {len(exc.partial)} more bytes, expected {exc.expected} more)"
    return f"{type(exc).__name__}: {exc}"


def _by_hand(url: str, dest: Path) -> str:
    return f"\nDownload it by hand (browser, curl or wget) from\n  {url}\nand save it as\n  {dest}"


def download_file(
    url: str,
    dest: Path,
    sha256: str | None = None,
    progress: bool = True,
    *,
    size: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    The data go to a temporary file in ``dest``'s folder. Before it is renamed to ``dest``, its
    size is checked against ``Content-Length`` (when sent) and ``size`` (when given), its SHA-256
    against ``sha256`` (when given: the digest or its first hex digits), and its first bytes against
    those of a PyTorch checkpoint (a proxy's or portal's web page is refused). On any failure,
    including Ctrl-C, the temporary file is removed and ``dest`` is left untouched. Failures raise
    :class:`DownloadError`; Ctrl-C is re-raised.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(dest.parent, os.W_OK | os.X_OK):  # a read-only mount or folder: say so, not "EROFS"
        raise DownloadError(f"Could not download {url}: the folder {dest.parent} is not writable (set "
                            f"$SEGANY_WEIGHTS_DIR to a writable folder for the weights cache).{_by_hand(url, dest)}")
    _remove_stale_parts(dest)
    # A unique temporary name, so two processes downloading the same file do not mix their data;
    # mode "xb" also keeps the user's umask (unlike mkstemp's 0600).
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    request = urllib.request.Request(url, headers={"User-Agent": "segany"})
    digest = hashlib.sha256()
    received = 0
    head = b""
    expected: int | None = None
    try:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "xb") as out:
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.strip().isdigit() else None
                with tqdm(
                    total=expected or size, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress, leave=False,
                ) as bar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        head += chunk[: 16 - len(head)]
                        received += len(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())  # the rename below must not publish data still in flight
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DownloadError(f"Could not download {url}: {_reason(exc, timeout)}.{_by_hand(url, dest)}") from exc
        _check_download(url, dest, received, expected, size, digest.hexdigest(), sha256, head)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):  # (a folder gone read-only: the error above is the one to see)
            tmp.unlink(missing_ok=True)
        raise
    return dest


def _check_download(url: str, dest: Path, received: int, expected: int | None, size: int | None,
                    actual_sha256: str, sha256: str | None, head: bytes) -> None:
    """Raise :class:`DownloadError` unless the downloaded data are complete and a checkpoint."""
    if expected is not None and received != expected:
        raise DownloadError(
            f"Could not download {url}: the download was cut off "
            f"({received} of {expected} bytes received).{_by_hand(url, dest)}"
        )
    # A web page in place of the file (a proxy's or network login page) is named as such, before
    # the size and digest checks that it also fails.
    if not head.startswith(_CHECKPOINT_STARTS):
        shown = head[:16].decode("ascii", "replace").replace("\n", " ")
        raise DownloadError(
            f"What {url} sent is not a PyTorch checkpoint (it starts with {shown!r}: a web page, "
            f"such as a proxy's or network login page?). It was not kept.{_by_hand(url, dest)}"
        )
    if size is not None and received != size:
        raise DownloadError(
            f"The file downloaded from {url} is not the published one: {received} bytes instead of "
            f"{size}. It was not kept.{_by_hand(url, dest)}"
        )
    if sha256 and not actual_sha256.startswith(sha256.lower()):
        raise DownloadError(
            f"The file downloaded from {url} is corrupt: its SHA-256 is {actual_sha256[:16]}..., "
            f"expected {sha256[:16]}.... It was not kept.{_by_hand(url, dest)}"
        )


def _remove_stale_parts(dest: Path) -> None:
    """Remove temporary files of earlier downloads of ``dest`` whose process is gone from this
    machine and that have not been written for :data:`STALE_PART_SECONDS`: a download killed
    outright (SIGKILL, power loss) cannot remove its own. Another machine's download into a
    shared folder keeps writing, so its file stays."""
    for part in dest.parent.glob(f"{glob.escape(dest.name)}.*.part"):
        pid = part.name[len(dest.name) + 1:].split("-", 1)[0]
        try:
            idle = time.time() - part.stat().st_mtime
        except OSError:
            continue
        if pid.isdigit() and idle > STALE_PART_SECONDS and not _process_exists(int(pid)):
            part.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    if os.name == "nt":  # there os.kill(pid, 0) would end the process: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or a platform without signal 0: assume it runs
        return True
    return True
