"""Example outputs of the embedded default model on real photos (issue 8): ``docs/default_box.png``
(one box prompt per photo, the box drawn in white) and ``docs/default_everything.png``
(segment-everything with looser filters, ``EVERYTHING``). The photos ship with scikit-image (coins, coffee, astronaut).

    python scripts/make_docs_images.py [--out docs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from segany import SAM

# Photo, and a box (x1, y1, x2, y2) around one object in it.
PHOTOS = {
    "coins": (182, 100, 226, 152),
    "coffee": (170, 20, 500, 330),
    "astronaut": (140, 0, 370, 220),
}
HEIGHT = 300  # each panel is scaled to this height
# The demo model is unsure on real photos: with its defaults segment-everything keeps 0, 0 and
# 12 masks here, so the picture uses looser filters (stated in the README).
EVERYTHING = dict(conf_thres=0.6, stability_score_thresh=0.0)


def photo(name: str) -> np.ndarray:
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3][..., ::-1])  # BGR, as segany draws


def panel(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (round(w * HEIGHT / h), HEIGHT), interpolation=cv2.INTER_AREA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SAM()  # the embedded default model
    box_panels, all_panels = [], []
    for name, box in PHOTOS.items():
        img = photo(name)
        r = model(img, bboxes=list(box))[0]
        drawn = r.plot(labels=False, boxes=False)
        cv2.rectangle(drawn, box[:2], box[2:], (255, 255, 255), 2)
        box_panels.append(panel(drawn))
        everything = model(img, **EVERYTHING)[0]
        all_panels.append(panel(everything.plot(labels=False, boxes=False)))
        print(f"{name}: box mask {int(r.masks.data.sum())} px; segment-everything {len(everything)} masks")
    gap = np.full((HEIGHT, 6, 3), 255, np.uint8)
    for file, panels in (("default_box.png", box_panels), ("default_everything.png", all_panels)):
        row = [p for q in panels for p in (q, gap)][:-1]
        cv2.imwrite(str(out / file), np.concatenate(row, 1))
        print(f"wrote {out / file}")


if __name__ == "__main__":
    main()
