"""Prompts through the model's decoder in chunks sized for the device."""

from __future__ import annotations

import torch
from torch import nn

# Prompts per decoder call. On a CPU a chunk's per-prompt image tensors should stay in cache:
# SAM's are 4 MB a prompt (64×64 tokens × 256 channels, fp32), and 64 boxes on ViT-B took 1.5-1.8 s
# in chunks of 4 against 1.9-2.0 s in chunks of 8, 16 or 64 (2 cores). Smaller embeddings take
# more prompts a chunk, as each call has a fixed cost. On a GPU, large chunks keep it busy.
CPU_CHUNK_BYTES = 16 * 2**20
DEFAULT_PROMPT_CHUNK = 64


def prompt_chunk(model: nn.Module) -> int:
    """How many prompts to decode together with ``model`` on its device."""
    if model.device.type != "cpu":
        return DEFAULT_PROMPT_CHUNK
    encoder = model.prompt_encoder
    size, dim = getattr(encoder, "image_embedding_size", (64, 64)), getattr(encoder, "embed_dim", 256)  # (a stand-in: SAM's)
    per_prompt = size[0] * size[1] * dim * 4
    return max(1, min(DEFAULT_PROMPT_CHUNK, CPU_CHUNK_BYTES // per_prompt))


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
    chunk = prompt_chunk(model)
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
