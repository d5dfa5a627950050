"""``segany serve``: run the API and the web page with uvicorn."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Any

from ..cli import TEXT_OPTIONS, UsageError, parse_options
from ..config import DEFAULT_MODEL
from ..errors import MissingDependencyError, ServeError

log = logging.getLogger("segany.serve")

SERVE_DEFAULTS: dict[str, Any] = dict(model=DEFAULT_MODEL, host="127.0.0.1", port=8000, device="", max_images=16,
                                      max_cache_mb=2048, max_pixels=40_000_000, max_body_mb=32, log_level="info")
SERVE_HELP = """\
usage: segany serve [model=segany_tiny.pt] [host=127.0.0.1] [port=8000] [key=value ...]

Serve a JSON API (docs at /docs) and a click-to-segment web page at / on http://host:port.
Needs the optional extra: pip install segany[serve]
  model         checkpoint name or path, e.g. sam_b.pt (segany_tiny.pt, the bundled demo)
  device        '', 'cpu', 'cuda:0', ...
  host          address to bind (127.0.0.1: this machine only; anything else is logged)
  port          port (8000)                          log_level   uvicorn log level (info)
  max_images    embeddings kept in the cache (16)    max_cache_mb  cache bound in MB (2048)
  max_pixels    largest image accepted (40000000)    max_body_mb   largest request body in MB (32)"""


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 / ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_serve_deps() -> None:
    """FastAPI, uvicorn and fastapi_offline, or a clear message naming the extra to install."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "fastapi_offline") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"segany serve needs {', '.join(missing)}: pip install segany[serve]")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), made before the model loads so that a
    taken port fails in a second with a message, not after the load with uvicorn's exit status 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use: stop the program using it, or pick "
                             f"another port (port={port + 1}; port=0 takes a free one)") from None
        fix = {errno.EACCES: f"port {port} needs administrator rights: use a port from 1024 up",
               errno.EADDRNOTAVAIL: "host= must be an address of this machine (" + (
                   "::1; :: for all)" if family == socket.AF_INET6 else "127.0.0.1; 0.0.0.0 for all)")}
        reason = e.strerror or str(e)
        raise ServeError(f"cannot listen on {host}:{port} ({reason}): "
                         f"{fix.get(e.errno, 'check host= and port=')}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port/`` of a bound socket, with the port it really got."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run_serve(tokens: list[str]) -> int:
    opts = {**SERVE_DEFAULTS, **parse_options(tokens, SERVE_DEFAULTS, command="serve", texts=TEXT_OPTIONS | {"host"})}
    if not 0 <= opts["port"] <= 65535:
        raise UsageError(f"port={opts['port']}: expected 0..65535")
    for key in ("max_images", "max_cache_mb", "max_pixels", "max_body_mb"):
        if opts[key] < 1:
            raise UsageError(f"{key}={opts[key]}: expected a positive integer")
    if str(opts["log_level"]).lower() not in LOG_LEVELS:  # before the model loads, not in uvicorn
        raise UsageError(f"log_level={opts['log_level']}: use one of {', '.join(LOG_LEVELS)}")
    require_serve_deps()
    import uvicorn

    from .app import create_app

    host = str(opts["host"])
    if host.startswith("[") and host.endswith("]"):  # [::1], as in a URL: the address inside
        host = host[1:-1]
    sock = listen(host, int(opts["port"]))
    if not is_loopback(host):
        log.warning("segany serve: binding %s makes the server reachable from other machines; "
                    "it has no authentication", host)
    with sock:
        app = create_app(str(opts["model"]), device=str(opts["device"]), max_images=opts["max_images"],
                         max_cache_bytes=opts["max_cache_mb"] << 20, max_pixels=opts["max_pixels"],
                         max_body_bytes=opts["max_body_mb"] << 20)
        print(f"segany serve: {url_of(sock)} (API docs at /docs)", flush=True)
        # host and port only for uvicorn's "running on" line, which would say 127.0.0.1:8000 whatever
        # the socket is bound to
        config = uvicorn.Config(app, host=host, port=sock.getsockname()[1], log_level=str(opts["log_level"]).lower())
        uvicorn.Server(config).run(sockets=[sock])
    return 0
