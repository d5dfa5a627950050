"""What a prediction run prints (``verbose=True``, and the command line): a line per image, as
Ultralytics prints it, and the mean speed per image at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .results import Results
from .saving import source_name

SPEED_KEYS = ("preprocess", "inference", "postprocess")


class RunReport:
    """Counts the images, masks and times of a run and words them.

    ``total``: images expected (``None`` when unknown); ``model``: its ``input_size(h, w)`` is
    shown on each line (an image's own size for a model without one)."""

    def __init__(self, total: int | None, model: Any) -> None:
        self.total = total
        self.input_size: Callable[[int, int], tuple[int, int]] = getattr(model, "input_size", lambda h, w: (h, w))
        self.images = self.masks = 0
        self.speed = dict.fromkeys(SPEED_KEYS, 0.0)

    def skip(self, name: str) -> None:
        """An expected image turned out unreadable: one fewer to come."""
        if self.total is not None:
            self.total -= 1

    def add(self, r: Results) -> dict[str, float]:
        """Count one result; returns its times in ms."""
        ms = {k: float(r.speed.get(k) or 0.0) for k in SPEED_KEYS}
        for k in SPEED_KEYS:
            self.speed[k] += ms[k]
        self.images += 1
        self.masks += len(r)
        return ms

    def image_line(self, r: Results, ms: dict[str, float]) -> str:
        """``image 2/5 bus.jpg: 1024x768 3 masks, 41.0ms`` (the model's input height x width) for
        the result just added."""
        h, w = self.input_size(*r.orig_shape)
        of = "?" if self.total is None else self.total
        return f"image {self.images}/{of} {source_name(r.path)}: {h}x{w} {r.verbose()}, {sum(ms.values()):.1f}ms"

    def speed_line(self) -> str:
        n = self.images
        if n == 0:
            return "Speed: no image was segmented"
        mean = ", ".join(f"{v / max(n, 1):.1f}ms {k}" for k, v in self.speed.items())
        return f"Speed: {mean} per image; {n} image{'s' * (n != 1)}, {self.masks} mask{'s' * (self.masks != 1)}"


def reported(results: Iterator[Results], report: RunReport) -> Iterator[Results]:
    """``results``, with a line printed for each as it passes and the speed line after the last."""
    for r in results:
        print(report.image_line(r, report.add(r)))
        yield r
    print(report.speed_line())
