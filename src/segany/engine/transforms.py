"""SAM's preprocessing: resize the longest side (antialiased, as Meta's ``ResizeLongestSide``),
scale prompt coordinates per axis, and bring low-resolution mask logits back to the original size."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size ``(h', w')`` of an ``h × w`` image resized so its longest side is ``long_side``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image_rgb: np.ndarray, long_side: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB → ``(h', w', 3)`` with PIL's antialiased bilinear filter (Meta's choice)."""
    h, w = preprocess_shape(image_rgb.shape[0], image_rgb.shape[1], long_side)
    if (h, w) == image_rgb.shape[:2]:
        return image_rgb
    return np.asarray(Image.fromarray(image_rgb).resize((w, h), Image.BILINEAR))


def image_to_tensor(image_bgr: np.ndarray, long_side: int, device: torch.device) -> torch.Tensor:
    """BGR uint8 ``(H, W, 3)`` → resized RGB float ``(1, 3, h', w')`` in 0..255, unnormalised."""
    rgb = np.ascontiguousarray(image_bgr[..., ::-1])
    resized = resize_longest_side(rgb, long_side)
    return torch.from_numpy(np.ascontiguousarray(resized)).to(device).permute(2, 0, 1)[None].float()


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """``(..., 2)`` x, y in original pixels → the resized input frame (per-axis scale, as Meta)."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= new_w / old_w
    out[..., 1] *= new_h / old_h
    return out


def upscale_logits(
    low_res: torch.Tensor, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Low-res logits ``(B, K, s, s)`` → logits at the original size ``(B, K, H, W)``.

    Same values as Meta's ``postprocess_masks`` (upsample to the padded input, crop, upsample to
    the original size) but the first upsampling covers only the low-res rows and columns that
    reach the unpadded region: bilinear upsampling with align_corners=False reads at most
    ``ceil(n / scale)`` source cells for ``n`` output cells, so cropping first changes nothing.
    """
    s = low_res.shape[-1]
    scale = img_size // s
    rows = min(s, math.ceil(input_size[0] / scale) + 1)
    cols = min(s, math.ceil(input_size[1] / scale) + 1)
    x = low_res[..., :rows, :cols]
    x = F.interpolate(x, (rows * scale, cols * scale), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)
