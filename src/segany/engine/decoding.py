"""Prompts through the model's decoder in chunks sized for the device."""

from __future__ import annotations

import torch
from torch import nn

# Prompts per decoder call. On a CPU a few prompts at a time keep the decoder's per-prompt image
# tensors (4 MB each for SAM) in cache: 64 boxes on ViT-B took 1.5-1.8 s in chunks of 4 against
# 1.9-2.0 s in chunks of 8, 16 or 64 (2 cores). On a GPU, large chunks keep it busy.
PROMPT_CHUNK = {"cpu": 4}
DEFAULT_PROMPT_CHUNK = 64


def prompt_chunk(device: torch.device) -> int:
    """How many prompts to decode together on ``device``."""
    return PROMPT_CHUNK.get(device.type, DEFAULT_PROMPT_CHUNK)


def decode_in_chunks(
    model: nn.Module,
    features,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    boxes: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
    multimask_output: bool = True,
    extent: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.decode`` over prompt chunks → low-res logits ``(N, K, h, w)`` and IoU ``(N, K)``.

    Arguments as for ``model.decode`` (``extent`` only for models that take it, SAM's); every
    prompt tensor has the N prompts in its first axis.
    """
    extra = {} if extent is None else dict(extent=extent)
    n = next(t.shape[0] for t in (points[0] if points else None, boxes, mask_inputs) if t is not None)
    chunk = prompt_chunk(model.device)
    outs = []
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        outs.append(model.decode(
            features,
            points=None if points is None else (points[0][sl], points[1][sl]),
            boxes=None if boxes is None else boxes[sl],
            mask_inputs=None if mask_inputs is None else mask_inputs[sl],
            multimask_output=multimask_output,
            **extra,
        ))
    if len(outs) == 1:
        return outs[0]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
