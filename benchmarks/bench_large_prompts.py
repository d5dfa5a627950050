"""Prompts on a large photo: the time from box prompts to original-size masks (median ms).

    python benchmarks/bench_large_prompts.py [--size 3000 4000] [--repeat 5]

The demo model (its decoder is SAM's; the image side does not matter here): the time is mostly the
masks at the photo's size. To compare two versions, run it with ``PYTHONPATH=<checkout>/src`` for
each, alternating, on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import segany
from segany import SAM


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    h, w = args.size
    predictor = SAM().predictor
    predictor.set_image((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8))
    box = [w // 8, h // 6, w * 5 // 8, h * 2 // 3]
    cases = {"1 box": dict(bboxes=box), "16 boxes": dict(bboxes=[box] * 16),
             "4 boxes x 3 masks": dict(bboxes=[box] * 4, multimask_output=True)}
    where = segany.__file__.rsplit("/src/", 1)[0]
    times = ", ".join(f"{name} {median_ms(lambda kw=kw: predictor(**kw), args.repeat):.1f} ms"
                      for name, kw in cases.items())
    print(f"{where} ({h}x{w}): {times}")


if __name__ == "__main__":
    main()
