"""Windowed attention's layout changes: a ``(B, H, W, C)`` map to padded windows and back
(SAM's ViT, MobileSAM's TinyViT and SAM 2's Hiera)."""

from __future__ import annotations

import math

import torch

from .common import Scratch


def window_partition(x: torch.Tensor, window_size: int, pad: torch.Tensor | None = None,
                     scratch: Scratch | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, H, W, C)`` → windows ``(B * nW, ws, ws, C)`` padded with zeros, or with the vector
    ``pad`` (C,) if given, and the padded size; ``scratch``: where the windows may be written.

    The tokens go straight into the windows' layout, one copy per rectangle of whole or cut
    windows, and only the padding is filled (no padded copy of the grid first)."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    hp, wp = h + pad_h, w + pad_w
    shape = (b, hp // window_size, wp // window_size, window_size, window_size, c)
    windows = x.new_empty(shape) if scratch is None else scratch.take("windows", math.prod(shape), x).view(shape)
    grid = windows.permute(0, 1, 3, 2, 4, 5)  # (B, rows of windows, ws, columns of windows, ws, C)
    for rows, cols in _window_blocks(h, w, window_size):
        grid[_in_windows(rows, cols, window_size)] = _as_windows(x[:, rows, cols], window_size)
    fill = 0.0 if pad is None else pad.to(x.dtype)
    if pad_h:
        grid[:, -1, window_size - pad_h :] = fill
    if pad_w:
        grid[:, :, :, -1, window_size - pad_w :] = fill
    return windows.view(-1, window_size, window_size, c), (hp, wp)


def _window_blocks(h: int, w: int, ws: int) -> list[tuple[slice, slice]]:
    """An ``h × w`` grid cut into whole windows and the cut ones at the far edges: up to four
    rectangles (rows, columns), each a regular array of windows of one size."""
    row_parts = [p for p in (slice(0, h // ws * ws), slice(h // ws * ws, h)) if p.stop > p.start]
    col_parts = [p for p in (slice(0, w // ws * ws), slice(w // ws * ws, w)) if p.stop > p.start]
    return [(r, c) for r in row_parts for c in col_parts]


def _as_windows(block: torch.Tensor, ws: int) -> torch.Tensor:
    """A ``(B, rows, cols, C)`` rectangle of :func:`_window_blocks` as ``(B, nY, rows in a window,
    nX, cols in a window, C)`` (a view)."""
    b, rows, cols, c = block.shape
    in_y, in_x = min(ws, rows), min(ws, cols)
    return block.view(b, rows // in_y, in_y, cols // in_x, in_x, c)


def _in_windows(rows: slice, cols: slice, ws: int) -> tuple[slice, ...]:
    """Where a rectangle of :func:`_window_blocks` lies in the ``(B, nY, ws, nX, ws, C)`` windows."""
    in_y, in_x = min(ws, rows.stop - rows.start), min(ws, cols.stop - cols.start)
    y0, x0 = rows.start // ws, cols.start // ws
    n_y, n_x = (rows.stop - rows.start) // in_y, (cols.stop - cols.start) // in_x
    return slice(None), slice(y0, y0 + n_y), slice(0, in_y), slice(x0, x0 + n_x), slice(0, in_x)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows → ``(B, H, W, C)`` without the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x
