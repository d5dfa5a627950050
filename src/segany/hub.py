"""The weights cache and the download of official checkpoints.

A model name resolves to a file in this order (SPEC §1): an existing path; the same file name in
the weights cache (``$SEGANY_WEIGHTS_DIR``, default ``~/.cache/segany``); a registry name or alias,
whose official file is looked up in the cache and downloaded there when absent.

Downloads stream to a temporary file beside the destination, are checked against the
``Content-Length`` and the SHA-256 prefix where known, and only then are renamed into place, so a
failed or interrupted download never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .errors import CheckpointNotFoundError, DownloadError
from .models.registry import MODELS, find_config

__all__ = ["weights_dir", "resolve_weights", "download_file"]

ENV_VAR = "SEGANY_WEIGHTS_DIR"
DEFAULT_TIMEOUT = 60.0  # seconds without data before a stalled connection counts as failed
_CHUNK = 1 << 20


def weights_dir() -> Path:
    """The weights cache folder: ``$SEGANY_WEIGHTS_DIR`` or ``~/.cache/segany``, created on demand."""
    env = os.environ.get(ENV_VAR, "").strip()
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "segany"
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True)
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
    if target.is_file():
        return target
    if not download:
        raise CheckpointNotFoundError(
            f"Checkpoint for {cfg.name!r} is not in the weights cache and download=False. "
            f"Download {cfg.weights.url} and put it at:\n  {target}\n"
            "or pass download=True, or pass the checkpoint's path."
        )
    return download_file(cfg.weights.url, target, cfg.weights.sha256_prefix, progress=progress)


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
    sha256_prefix: str | None = None,
    progress: bool = True,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    The data go to a temporary file in ``dest``'s folder; its size is checked against
    ``Content-Length`` (when sent) and its SHA-256 against ``sha256_prefix`` (when given) before
    it is renamed to ``dest``. On any failure, including Ctrl-C, the temporary file is removed and
    ``dest`` is left untouched. Failures raise :class:`DownloadError`; Ctrl-C is re-raised.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name, so two processes downloading the same file do not mix their data;
    # mode "xb" also keeps the user's umask (unlike mkstemp's 0600).
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    request = urllib.request.Request(url, headers={"User-Agent": "segany"})
    digest = hashlib.sha256()
    received = 0
    expected: int | None = None
    try:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "xb") as out:
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.strip().isdigit() else None
                with tqdm(
                    total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress, leave=False,
                ) as bar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())  # the rename below must not publish data still in flight
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DownloadError(f"Could not download {url}: {_reason(exc, timeout)}.{_by_hand(url, dest)}") from exc

        if expected is not None and received != expected:
            raise DownloadError(
                f"Could not download {url}: the download was cut off "
                f"({received} of {expected} bytes received).{_by_hand(url, dest)}"
            )
        if sha256_prefix:
            actual = digest.hexdigest()
            if not actual.startswith(sha256_prefix.lower()):
                raise DownloadError(
                    f"The file downloaded from {url} is corrupt: its SHA-256 is {actual[:16]}..., "
                    f"expected it to start with {sha256_prefix}. It was not kept.{_by_hand(url, dest)}"
                )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
