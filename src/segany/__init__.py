"""segany: promptable image segmentation with the Segment Anything family.

The public names are imported on first use, so ``segany --help`` and usage errors do not pay
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SAM": "segany.model",
    "Predictor": "segany.engine.predictor",
    "Results": "segany.engine.results",
    "auto_annotate": "segany.annotate",
}

__all__ = ["SAM", "Predictor", "Results", "auto_annotate", "__version__"]

if TYPE_CHECKING:
    from .annotate import auto_annotate
    from .engine.predictor import Predictor
    from .engine.results import Results
    from .model import SAM


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segany' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
