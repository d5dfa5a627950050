"""``segany serve``: run the API and the web page with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from ..cli import UsageError, parse_options
from ..config import DEFAULT_MODEL
from ..errors import MissingDependencyError

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
    """FastAPI and uvicorn, or a clear message naming the extra to install."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"segany serve needs {' and '.join(missing)}: pip install segany[serve]")


def run_serve(tokens: list[str]) -> int:
    opts = {**SERVE_DEFAULTS, **parse_options(tokens, SERVE_DEFAULTS, command="serve")}
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
    if not is_loopback(host):
        log.warning("segany serve: binding %s makes the server reachable from other machines; "
                    "it has no authentication", host)
    app = create_app(str(opts["model"]), device=str(opts["device"]), max_images=opts["max_images"],
                     max_cache_bytes=opts["max_cache_mb"] << 20, max_pixels=opts["max_pixels"],
                     max_body_bytes=opts["max_body_mb"] << 20)
    print(f"segany serve: http://{host}:{opts['port']}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=int(opts["port"]), log_level=str(opts["log_level"]).lower())
    return 0
