"""A synthetic segmentation dataset: images with known instance masks, deterministic by seed.

Each image has a textured background (solid, gradient, noise, stripes, checker, or a crop of a
scikit-image sample photo when ``skimage`` is installed) and a few objects (rotated rectangles,
ellipses, random polygons, stars) in varied sizes, colours and textures. Later objects occlude
earlier ones; the masks are the *visible* parts, so overlaps are real instance boundaries.

    from segany.data import SyntheticDataset, write_synthetic
    ds = SyntheticDataset(n=100, seed=0, size=256)       # in memory, sample i is made on demand
    write_synthetic("data/synth", n=100, seed=0, format="coco")   # images/ + annotations.json
    write_synthetic("data/synth_yolo", n=100, seed=0, format="yolo")  # images/ + labels/*.txt
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .datasets import Sample, SegDataset

SHAPES = ("rectangle", "ellipse", "polygon", "star")
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left")


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """BGR sample photos from scikit-image (an optional dependency); none when it is missing."""
    try:
        from skimage import data as skdata
    except ImportError:
        return ()
    out = []
    for name in _SKIMAGE_PHOTOS:
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception:  # a photo that needs a download (pooch) or is absent in this version
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3][..., ::-1]).astype(np.uint8))
    return tuple(out)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def texture(rng: np.random.Generator, h: int, w: int, photos: bool = True) -> np.ndarray:
    """A random ``(h, w, 3)`` float texture in 0..255: solid, gradient, noise, stripes, checker or photo."""
    kinds = ["solid", "gradient", "noise", "stripes", "checker"] + (["photo"] if photos and _photos() else [])
    kind = kinds[rng.integers(len(kinds))]
    c1, c2 = _colour(rng), _colour(rng)
    if kind == "solid":
        return np.broadcast_to(c1, (h, w, 3)).copy()
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        return c1 * (1 - t[..., None]) + c2 * t[..., None]
    if kind == "noise":
        sigma = rng.uniform(5, 40)
        return np.clip(c1 + rng.normal(0, sigma, (h, w, 3)), 0, 255).astype(np.float32)
    if kind in ("stripes", "checker"):
        period = rng.uniform(4, 24)
        a = rng.uniform(0, math.pi)
        u = (xx * math.cos(a) + yy * math.sin(a)) // period
        if kind == "checker":
            u = u + (-xx * math.sin(a) + yy * math.cos(a)) // period
        t = (u % 2)[..., None]
        return c1 * (1 - t) + c2 * t
    photo = _photos()[rng.integers(len(_photos()))]
    ph, pw = photo.shape[:2]
    scale = max(h / ph, w / pw) * rng.uniform(1.0, 2.0)  # a random crop, never smaller than the target
    big = cv2.resize(photo, (max(w, int(pw * scale + 1)), max(h, int(ph * scale + 1))), interpolation=cv2.INTER_AREA)
    y0, x0 = rng.integers(0, big.shape[0] - h + 1), rng.integers(0, big.shape[1] - w + 1)
    return big[y0 : y0 + h, x0 : x0 + w].astype(np.float32)


def shape_polygon(rng: np.random.Generator, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Vertices ``(K, 2)`` of one shape of radius about ``r`` centred at ``(cx, cy)``, randomly rotated."""
    a0 = rng.uniform(0, 2 * math.pi)
    if kind == "rectangle":
        aspect = rng.uniform(0.3, 1.0)
        hw, hh = r, r * aspect
        pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
    elif kind == "ellipse":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = np.stack([r * np.cos(t), r * rng.uniform(0.35, 1.0) * np.sin(t)], 1)
    elif kind == "polygon":
        k = int(rng.integers(3, 9))
        t = np.sort(rng.uniform(0, 2 * math.pi, k))
        rad = r * rng.uniform(0.5, 1.0, k)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif kind == "star":
        k = int(rng.integers(4, 8))
        t = np.arange(2 * k) * math.pi / k
        rad = np.where(np.arange(2 * k) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    rot = np.array([[math.cos(a0), -math.sin(a0)], [math.sin(a0), math.cos(a0)]])
    return pts @ rot.T + np.array([cx, cy])


def make_sample(seed: int, size: int | tuple[int, int] = 256, max_objects: int = 6, min_area: int = 64,
                photos: bool = True) -> Sample:
    """One synthetic image (BGR uint8) with its visible instance masks and shape classes."""
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    canvas = texture(rng, h, w, photos)
    full_masks, classes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind_id = int(rng.integers(len(SHAPES)))
        r = rng.uniform(0.06, 0.3) * min(h, w)
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        poly = shape_polygon(rng, SHAPES[kind_id], cx, cy, r)
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [np.round(poly * 4).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=2)
        if m.sum() < min_area:
            continue
        # The object's texture covers only its bounding box: most of the cost of a sample.
        x, y, bw, bh = cv2.boundingRect(m)
        fill = texture(rng, bh, bw, photos)
        if rng.random() < 0.7:  # mostly flat-ish objects: pull the texture towards one colour for contrast
            fill = 0.5 * fill + 0.5 * _colour(rng)
        inside = m[y : y + bh, x : x + bw].astype(bool)
        canvas[y : y + bh, x : x + bw][inside] = fill[inside]
        full_masks.append(m.astype(bool))
        classes.append(kind_id)
    # Visible part of each object: what no later object covers.
    masks, keep_classes = [], []
    covered = np.zeros((h, w), bool)
    for m, c in zip(reversed(full_masks), reversed(classes)):
        visible = m & ~covered
        covered |= m
        if visible.sum() >= min_area:
            masks.append(visible)
            keep_classes.append(c)
    masks.reverse()
    keep_classes.reverse()
    if rng.random() < 0.5:  # mild sensor noise and blur, so edges are not perfectly crisp
        canvas = cv2.GaussianBlur(canvas, (3, 3), 0) + rng.normal(0, 3, canvas.shape)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    stack = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    return Sample(image, stack, np.asarray(keep_classes, np.int64), f"synthetic_{seed:08d}.png")


class SyntheticDataset(SegDataset):
    """``n`` synthetic samples made on demand; sample ``i`` depends only on ``(seed, i)``."""

    def __init__(self, n: int = 1000, seed: int = 0, size: int = 256, max_objects: int = 6,
                 photos: bool = True) -> None:
        self.n, self.seed, self.size, self.max_objects, self.photos = n, seed, size, max_objects, photos

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        # Distinct seeds per (dataset seed, index) that do not collide across nearby dataset seeds.
        return make_sample(self.seed * 1_000_003 + i, self.size, self.max_objects, photos=self.photos)


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours ``(K, 2)`` (x, y) of a binary mask, largest first."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = sorted((c.reshape(-1, 2) for c in contours if len(c) >= 3), key=lambda c: -cv2.contourArea(c))
    return list(contours)


def write_synthetic(out_dir: str | Path, n: int = 100, seed: int = 0, size: int = 256, format: str = "coco",
                    max_objects: int = 6, photos: bool = True) -> Path:
    """Write ``n`` synthetic samples as ``images/*.png`` plus COCO ``annotations.json`` (RLE masks)
    or YOLO-seg ``labels/*.txt`` (normalised polygons, class = shape id). Returns ``out_dir``."""
    from pycocotools import mask as mask_utils

    if format not in ("coco", "yolo"):
        raise ValueError(f"format must be 'coco' or 'yolo', not {format!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = SyntheticDataset(n, seed, size, max_objects, photos)
    images, annotations = [], []
    for i in range(n):
        s = ds[i]
        name = f"{i:06d}.png"
        cv2.imwrite(str(out / "images" / name), s.image)
        h, w = s.image.shape[:2]
        if format == "yolo":
            (out / "labels").mkdir(exist_ok=True)
            lines = []
            for m, c in zip(s.masks, s.classes):
                for poly in mask_polygons(m)[:1]:  # YOLO-seg holds one polygon per instance: the largest part
                    xy = (poly / np.array([w, h])).reshape(-1)
                    lines.append(f"{int(c)} " + " ".join(f"{v:.6f}" for v in xy))
            (out / "labels" / f"{i:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            continue
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        for m, c in zip(s.masks, s.classes):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=int(c) + 1,
                                    segmentation=rle, area=int(m.sum()), bbox=[x, y, bw, bh], iscrowd=0))
    if format == "coco":
        cats = [dict(id=k + 1, name=name) for k, name in enumerate(SHAPES)]
        info = dict(description=f"segany synthetic, n={n} seed={seed} size={size}")
        doc = dict(info=info, images=images, annotations=annotations, categories=cats)
        (out / "annotations.json").write_text(json.dumps(doc))
    else:
        (out / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    return out
