"""``segany serve``: a JSON API and a click-to-segment web page (optional extra ``segany[serve]``).

:func:`create_app` builds the FastAPI app; importing this package does not import FastAPI, so the
command line can say which extra to install when it is missing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
