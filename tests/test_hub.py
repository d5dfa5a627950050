"""Weights cache and downloads, against a real HTTP server on 127.0.0.1 (no outside traffic)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import segany.hub as hub
from segany.errors import CheckpointNotFoundError, ConfigError, DownloadError
from segany.hub import download_file, resolve_weights, weights_dir
from segany.models import registry
from segany.models.registry import WeightsFile

# More than one chunk, not a multiple of it; it starts as a checkpoint (a zip archive) does.
GOOD = b"PK\x03\x04" + os.urandom(3 * hub._CHUNK // 2 + 13)
PAGE = b"<!DOCTYPE html><html><body>Log in to use this network</body></html>"
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: the server closes the connection after each response, which is what
    # makes the truncated and no-Content-Length responses end.
    protocol_version = "HTTP/1.0"
    counts: collections.Counter = collections.Counter()
    release = threading.Event()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _head(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self) -> None:
        self.counts[self.path] += 1
        if self.path in ("/good", "/bad_sha"):
            self._head(len(GOOD))
            self.wfile.write(GOOD)
        elif self.path == "/page":  # a captive portal's answer: 200, a length, and no checkpoint
            self._head(len(PAGE))
            self.wfile.write(PAGE)
        elif self.path == "/no_length":
            self._head(None)
            self.wfile.write(GOOD)
        elif self.path == "/truncated":
            self._head(len(GOOD))  # promise everything, send a third, then close
            self.wfile.write(GOOD[: len(GOOD) // 3])
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/stall":
            self._head(len(GOOD))
            self.wfile.write(GOOD[:100])
            self.wfile.flush()
            self.release.wait(5)  # bounded; released at teardown
        else:
            self.send_error(404, "Not Found")


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        _Handler.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture()
def counts():
    _Handler.counts.clear()
    return _Handler.counts


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SEGANY_WEIGHTS_DIR", str(folder))
    return folder


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.pt"  # nothing listens there: connection refused


def _register(monkeypatch, url: str, sha: str | None = GOOD_SHA[:6]) -> registry.ModelConfig:
    cfg = dataclasses.replace(
        registry.MODELS["sam_b"],
        name="test_model",
        aliases=("test_model.pt",),
        weights=WeightsFile(f"test_model_{GOOD_SHA[:6]}.pth", url, sha),
    )
    monkeypatch.setitem(registry.MODELS, cfg.name, cfg)
    return cfg


# --- download_file ------------------------------------------------------------------------------


def test_download_good(server, counts, tmp_path):
    dest = tmp_path / "w.pth"
    assert download_file(server + "/good", dest, GOOD_SHA[:6], progress=False) == dest
    assert dest.read_bytes() == GOOD
    assert os.listdir(tmp_path) == ["w.pth"]
    assert counts["/good"] == 1


def test_download_without_content_length(server, tmp_path):
    dest = tmp_path / "sub" / "w.pth"  # parent folder is created
    download_file(server + "/no_length", dest, GOOD_SHA[:10], progress=False)
    assert dest.read_bytes() == GOOD
    assert os.listdir(dest.parent) == ["w.pth"]


def test_download_progress_bar(server, tmp_path, capsys):
    dest = tmp_path / "w.pth"
    download_file(server + "/good", dest, progress=True)
    assert dest.read_bytes() == GOOD


def test_download_replaces_existing_file(server, tmp_path):
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"old")
    download_file(server + "/good", dest, progress=False)
    assert dest.read_bytes() == GOOD


@pytest.mark.parametrize(
    "path, sha, words",
    [
        ("/truncated", None, "cut off"),
        ("/bad_sha", "0" * 6 if not GOOD_SHA.startswith("000000") else "1" * 6, "corrupt"),
        ("/missing", None, "404"),
        ("/page", None, "not a PyTorch checkpoint (it starts with '<!DOCTYPE html><'"),
    ],
)
def test_download_failures_leave_nothing(server, tmp_path, path, sha, words):
    dest = tmp_path / "w.pth"
    url = server + path
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, sha, progress=False)
    message = str(info.value)
    assert url in message and words in message and str(dest) in message
    assert os.listdir(tmp_path) == []


def test_a_web_page_is_named_before_the_published_size(server, tmp_path):
    with pytest.raises(DownloadError, match="not a PyTorch checkpoint"):
        download_file(server + "/page", tmp_path / "w.pth", GOOD_SHA, progress=False, size=len(GOOD))
    assert os.listdir(tmp_path) == []


def test_download_checks_the_published_size_and_digest(server, tmp_path):
    dest = tmp_path / "w.pth"
    assert download_file(server + "/good", dest, GOOD_SHA, progress=False, size=len(GOOD)) == dest
    assert dest.read_bytes() == GOOD
    dest.unlink()
    with pytest.raises(DownloadError, match=f"{len(GOOD)} bytes instead of {len(GOOD) + 1}"):
        download_file(server + "/no_length", dest, progress=False, size=len(GOOD) + 1)
    assert os.listdir(tmp_path) == []


def test_official_weights_carry_their_published_sha256():
    """Meta's file names end in the start of the file's MD5, not of its SHA-256: a check against
    the name rejected every real download. The registry holds the published SHA-256 and size."""
    for name in ("sam_b", "sam_l", "sam_h", "mobile_sam"):
        weights = registry.MODELS[name].weights
        assert len(weights.sha256) == 64 and int(weights.sha256, 16) and weights.size > 10**7
        stem = Path(weights.filename).stem
        assert not weights.sha256.startswith(stem.rsplit("_", 1)[-1])
    assert registry.MODELS["sam_b"].weights.sha256.startswith("ec2df627")


def test_download_removes_stale_parts_of_dead_processes(server, tmp_path):
    dest = tmp_path / "w.pth"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    old = time.time() - hub.STALE_PART_SECONDS - 60
    stale = tmp_path / f"w.pth.{dead}-0badf00d.part"  # its process is gone, untouched for long
    fresh = tmp_path / f"w.pth.{dead}-00000001.part"  # another machine's download, still writing
    running = tmp_path / f"w.pth.{os.getpid()}-00000002.part"  # a live process's (suspended) download
    other = tmp_path / f"x.pth.{dead}-00000003.part"  # another file's
    for part in (stale, fresh, running, other):
        part.write_bytes(b"partial")
        if part is not fresh:
            os.utime(part, (old, old))
    download_file(server + "/good", dest, progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (dest, fresh, running, other))


def test_download_failure_keeps_existing_dest(server, tmp_path):
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"old")
    with pytest.raises(DownloadError):
        download_file(server + "/truncated", dest, progress=False)
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.pth"]


def test_download_offline(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "w.pth", progress=False, timeout=5)
    assert url in str(info.value) and "offline" in str(info.value)
    assert isinstance(info.value, OSError)
    assert os.listdir(tmp_path) == []


def test_download_timeout(server, tmp_path):
    url = server + "/stall"
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "w.pth", progress=False, timeout=0.3)
    assert url in str(info.value) and "timed out" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_download_keyboard_interrupt_cleans_up(server, tmp_path, monkeypatch):
    class InterruptingBar(hub.tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    monkeypatch.setattr(hub, "tqdm", InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        download_file(server + "/good", tmp_path / "w.pth", progress=False)
    assert os.listdir(tmp_path) == []


# --- weights_dir and resolve_weights ---------------------------------------------------------------


def test_weights_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGANY_WEIGHTS_DIR", str(tmp_path / "a" / "b"))
    assert weights_dir() == tmp_path / "a" / "b" and weights_dir().is_dir()
    monkeypatch.delenv("SEGANY_WEIGHTS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_dir() == tmp_path / "home" / ".cache" / "segany" and weights_dir().is_dir()


def test_resolve_downloads_once_then_uses_cache(server, counts, cache, monkeypatch):
    cfg = _register(monkeypatch, server + "/good")
    target = cache / cfg.weights.filename
    assert resolve_weights("test_model.pt", progress=False) == target
    assert target.read_bytes() == GOOD
    assert counts["/good"] == 1
    # Alias, registry name and canonical file name all find the cached file without a request.
    for name in ("test_model.pt", "test_model", cfg.weights.filename):
        assert resolve_weights(name, progress=False) == target
    assert counts["/good"] == 1
    assert os.listdir(cache) == [cfg.weights.filename]


def test_resolve_download_failure(server, cache, monkeypatch):
    cfg = _register(monkeypatch, server + "/missing")
    with pytest.raises(DownloadError) as info:
        resolve_weights("test_model.pt", progress=False)
    message = str(info.value)
    assert server + "/missing" in message and str(cache / cfg.weights.filename) in message
    assert os.listdir(cache) == []


def test_resolve_existing_path(tmp_path, cache, counts):
    ckpt = tmp_path / "mine.pt"
    ckpt.write_bytes(b"x")
    assert resolve_weights(ckpt) == ckpt
    assert resolve_weights(str(ckpt)) == ckpt
    assert sum(counts.values()) == 0


def test_resolve_cache_hit_by_file_name(tmp_path, cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "custom.pt").write_bytes(b"x")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_weights("custom.pt") == cache / "custom.pt"
    # A user-placed file under an alias name wins over downloading the canonical one, whichever
    # of the model's names the user types.
    (cache / "sam_b.pt").write_bytes(b"y")
    for name in ("sam_b.pt", "sam_b", "sam_vit_b_01ec64.pth", "sam_vit_b.pth"):
        assert resolve_weights(name, download=False) == cache / "sam_b.pt"
    (cache / "sam_vit_b_01ec64.pth").write_bytes(b"z")  # the official file, when both are there
    assert resolve_weights("sam_b", download=False) == cache / "sam_vit_b_01ec64.pth"


def test_download_into_a_read_only_folder_is_a_download_error(server, tmp_path, monkeypatch):
    # A read-only mount (root passes permission bits, so access() stands in for the mount here)
    from segany import hub

    real_access = os.access
    monkeypatch.setattr(hub.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(DownloadError, match=r"the folder .* is not writable \(set \$SEGANY_WEIGHTS_DIR"):
        download_file(server + "/good", tmp_path / "w.pth", GOOD_SHA[:6], progress=False)
    monkeypatch.undo()
    # A failure whose clean-up fails too (the folder went read-only meanwhile): the download's error
    # is the one raised, not the clean-up's OSError.
    def unlink(self, missing_ok=False):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(DownloadError, match="is corrupt: its SHA-256"):
        download_file(server + "/good", tmp_path / "w.pth", "0" * 64, progress=False)  # a wrong digest


def test_unusable_weights_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    monkeypatch.setenv("SEGANY_WEIGHTS_DIR", str(blocker / "weights"))
    with pytest.raises(ConfigError, match=r"weights cache folder .*weights cannot be used .*SEGANY_WEIGHTS_DIR"):
        resolve_weights("sam_b.pt", download=False)


def test_resolve_directory_is_an_error(tmp_path, cache):
    with pytest.raises(CheckpointNotFoundError, match="directory"):
        resolve_weights(tmp_path)


def test_resolve_unknown_name_lists_known_models(cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_weights("nope.pt")
    message = str(info.value)
    assert "nope.pt" in message and "not found" in message
    for name in ("sam_b", "sam_b.pt", "sam_vit_h_4b8939.pth", "mobile_sam.pt"):
        assert name in message
    assert "path" in message
    assert isinstance(info.value, FileNotFoundError)


def test_resolve_no_download_says_where_to_put_it(server, counts, cache, monkeypatch):
    cfg = _register(monkeypatch, server + "/good")
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_weights("test_model.pt", download=False)
    message = str(info.value)
    assert str(cache / cfg.weights.filename) in message and cfg.weights.url in message
    assert sum(counts.values()) == 0
    assert os.listdir(cache) == []
