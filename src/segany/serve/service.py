"""What the API does with the model: decode uploads, encode, prompt, segment everything.

The ``encode``/``prompt``/``everything`` methods run on the model thread (:mod:`.worker`);
``decode_upload`` runs in a request thread (no model involved). Nothing here touches a path on
the server: images arrive as bytes and results leave as JSON.
"""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..engine.image_state import ImageState
from ..engine.predictor import Predictor
from ..errors import ImageError
from .cache import LRU
from .schemas import api_wording


class TooLargeError(ImageError):
    """An image over the pixel cap (HTTP 413)."""


@dataclass
class CachedImage:
    """An uploaded image and its embedding, cached under the hash of its bytes."""

    id: str
    state: ImageState
    nbytes: int


def content_id(data: bytes) -> str:
    """The id of an upload: the first 32 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


def _state_nbytes(state: ImageState) -> int:
    """Bytes of the tensors an encoded image keeps (features and what was prepared from them),
    each storage counted once."""
    seen: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                visit(v)

    visit(state.features)
    visit(state.decoder_input)
    return sum(seen.values())


def png_base64(mask: np.ndarray) -> str:
    """``(H, W)`` bool → base64 of a grayscale PNG (255 = mask)."""
    import cv2

    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 2-D array
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


class SegmentService:
    """The predictor plus the embedding cache (LRU by count and bytes) and the logits cache."""

    def __init__(self, predictor: Predictor, name: str, max_images: int = 16, max_cache_bytes: int = 2 << 30,
                 max_pixels: int = 40_000_000, max_logits: int = 256) -> None:
        self.predictor = predictor
        self.name = name
        self.max_pixels = int(max_pixels)
        from PIL import Image

        # Pillow refuses images over twice its own limit (~179 MP) whatever the server's cap: a
        # higher cap raises that limit, once, for this server process.
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        self.images: LRU[CachedImage] = LRU(max_images, max_cache_bytes, lambda e: e.nbytes)
        # Low-res logits of returned masks, for refinement prompts (mask_input); 4 bytes a pixel.
        self.logits: LRU[tuple[str, torch.Tensor]] = LRU(max_logits, max_logits << 18,
                                                         lambda v: v[1].numel() * 4)

    # -- request threads ----------------------------------------------------------------------
    def decode_upload(self, data: bytes) -> np.ndarray:
        """Image bytes → BGR array. The pixel cap is checked on the header, before decoding."""
        from PIL import Image

        from ..engine.pixels import bomb_sizes, decode_bytes

        if not data:
            raise ImageError("the upload is empty (0 bytes), not an image")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Image.DecompressionBombError as e:  # over twice Pillow's limit: refused from the header
            sizes = bomb_sizes(e)
            raise TooLargeError(self._too_large(f"{sizes[0]} pixels" if sizes else "larger than Pillow reads")) from None
        except Exception:
            # Formats only OpenCV reads (Radiance .hdr, ...) cannot be sized before decoding, and a
            # few MB of them can decode to gigabytes: refused, where a local file would be read.
            raise ImageError("the upload is not an image in a format this server reads "
                             "(PNG, JPEG, WebP, TIFF, BMP, GIF, ...)") from None
        self._check_pixels(w, h)
        # No warnings.catch_warnings here: it is not thread-safe, and uploads decode in request
        # threads while the model thread records a prompt's warnings.
        return decode_bytes(data, "the upload")

    def _check_pixels(self, w: int, h: int) -> None:
        if w * h > self.max_pixels:
            raise TooLargeError(self._too_large(f"{w}x{h} = {w * h} pixels"))

    def _too_large(self, size: str) -> str:
        # The fix is named: the client can downscale, the operator can raise the cap.
        return (f"the image is {size}, over this server's cap of {self.max_pixels} pixels: downscale it, "
                "or start the server with a larger max_pixels=")

    def logits_for(self, image_id: str, ids: list[str]) -> torch.Tensor:
        """Stacked low-res logits ``(N, h, w)`` for ``mask_input`` ids returned earlier for this image."""
        out = []
        for i, lid in enumerate(ids):
            entry = self.logits.get(lid)
            if entry is None:
                raise KeyError(f"mask_input[{i}] = {lid!r} is not a logits_id of a recent answer (expired or unknown)")
            if entry[0] != image_id:
                raise KeyError(f"mask_input[{i}] = {lid!r} belongs to another image")
            out.append(entry[1])
        return torch.stack(out)

    # -- model thread -------------------------------------------------------------------------
    def encode(self, image_id: str, img: np.ndarray) -> CachedImage:
        """Encode and cache (a second upload of the same bytes reuses the first embedding)."""
        entry = self.images.get(image_id)
        if entry is not None:
            return entry
        p = self.predictor
        state = p._encode_states([(image_id, img)], p.args)[0]
        entry = CachedImage(image_id, state, _state_nbytes(state) + img.nbytes)
        self.images.put(image_id, entry)
        return entry

    def prompt(self, entry: CachedImage, prompts: dict[str, Any], multimask: bool, png: bool,
               polygons: bool) -> dict[str, Any]:
        """Masks for the prompts, in prompt order (with ``multimask`` 3 per prompt, best first)."""
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = self._call(entry, multimask_output=multimask, **prompts)
        k = 3 if multimask else 1
        masks = self._masks(entry, r, png, polygons, logits=True)
        for i, m in enumerate(masks):
            m["prompt"], m["rank"] = i // k, i % k
        return dict(image_id=entry.id, width=r.orig_shape[1], height=r.orig_shape[0], multimask_output=multimask,
                    masks=masks, warnings=sorted({api_wording(str(w.message)) for w in caught}),
                    time_ms=round((time.perf_counter() - t0) * 1000, 2))

    def everything(self, entry: CachedImage, options: dict[str, Any], png: bool, polygons: bool) -> dict[str, Any]:
        """Segment-everything on the cached embedding (crops are encoded afresh)."""
        t0 = time.perf_counter()
        r = self._call(entry, **options)
        return dict(image_id=entry.id, width=r.orig_shape[1], height=r.orig_shape[0],
                    masks=self._masks(entry, r, png, polygons, logits=False),
                    time_ms=round((time.perf_counter() - t0) * 1000, 2))

    def _call(self, entry: CachedImage, **kwargs: Any):
        # The predictor's image is the cached state: the same code path as SAM(...) on that image.
        self.predictor.image = entry.state
        try:
            return self.predictor(**kwargs)[0]
        finally:
            self.predictor.image = None  # nothing outlives the job but the cache entry

    def _masks(self, entry: CachedImage, r, png: bool, polygons: bool, logits: bool) -> list[dict[str, Any]]:
        data = r.masks.data.cpu().numpy()
        xy = r.masks.xy if polygons else None
        out = []
        for i, ann in enumerate(r.to_coco()):
            m: dict[str, Any] = dict(score=ann["score"], area=ann["area"], bbox=ann["bbox"], rle=ann["segmentation"])
            for key in ("predicted_iou", "stability_score", "point_coords", "crop_box"):
                if key in ann:
                    m[key] = ann[key]
            if logits and r.low_res_logits is not None:
                lid = secrets.token_hex(12)
                self.logits.put(lid, (entry.id, r.low_res_logits[i].detach().cpu().float().clone()))
                m["logits_id"] = lid
            if png:
                m["png"] = png_base64(data[i])
            if xy is not None:
                m["polygon"] = np.round(np.asarray(xy[i], dtype=np.float64), 2).tolist()
            out.append(m)
        return out
