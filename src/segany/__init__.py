"""segany: promptable image segmentation with the Segment Anything family."""

__version__ = "0.1.0"

from .engine.predictor import Predictor  # noqa: E402
from .engine.results import Results  # noqa: E402
from .model import SAM  # noqa: E402
from .annotate import auto_annotate  # noqa: E402

__all__ = ["SAM", "Predictor", "Results", "__version__", "auto_annotate"]
