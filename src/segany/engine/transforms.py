"""Images and prompt coordinates into a model's input frame.

A model says how it wants images resized through ``model.resize_mode``:
- ``"longest_side"`` (SAM): longest side to the model size with PIL's antialiased bilinear
  filter, exactly as Meta's ``ResizeLongestSide``; the model pads the rest.
- ``"stretch"`` (SAM 2): both sides to the model size, antialiased bilinear on the float image,
  as ``sam2``'s transforms do.
``model.input_size(h, w)`` gives the resized size; prompt coordinates are scaled per axis.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F


def image_to_tensor(image_bgr: np.ndarray, size: tuple[int, int], device: torch.device,
                    mode: str = "longest_side") -> torch.Tensor:
    """BGR uint8 ``(H, W, 3)`` → resized RGB float ``(1, 3, h', w')`` in 0..255, unnormalised."""
    rgb = np.ascontiguousarray(image_bgr[..., ::-1])
    h, w = size
    if mode == "longest_side":
        if (h, w) != rgb.shape[:2]:
            rgb = np.array(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))  # writable copy
        return torch.from_numpy(np.array(rgb)).to(device).permute(2, 0, 1)[None].float()
    if mode == "stretch":
        x = torch.from_numpy(np.array(rgb)).to(device).permute(2, 0, 1)[None].float()
        return F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"unknown resize mode {mode!r}")


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """``(..., 2)`` x, y in original pixels → the resized input frame (per-axis scale, as Meta)."""
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= input_size[1] / original_size[1]
    out[..., 1] *= input_size[0] / original_size[0]
    return out
