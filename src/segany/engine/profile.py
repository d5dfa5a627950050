"""Model summaries for ``info()``: parameters, layers, GFLOPs really counted, checkpoint size."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.registry import ModelConfig, build_model


def count_gflops(config: ModelConfig) -> float:
    """GFLOPs of one image encoding plus one single-box decode at the model's working size.

    Counted with ``torch.utils.flop_counter`` on a copy built on the meta device, so nothing is
    computed and no memory is allocated for the weights.
    """
    with torch.device("meta"):
        model = build_model(config)
        size = model.img_size
        x = torch.empty(1, 3, size, size)
        box = torch.tensor([[0.0, 0.0, size / 2, size / 2]])
        with FlopCounterMode(display=False) as counter:
            emb = model.encode_image(x)
            model.decode(emb, boxes=box, multimask_output=True)
    return counter.get_total_flops() / 1e9


def summarize(model: nn.Module, config: ModelConfig | None, checkpoint: str | None = None) -> dict[str, Any]:
    """The figures of ``info()``: name, layers, parameters, gradients, GFLOPs, size in MB."""
    params = sum(p.numel() for p in model.parameters())
    return dict(
        name=config.name if config else type(model).__name__,
        description=config.description if config else "",
        layers=sum(1 for _ in model.modules()),
        parameters=params,
        gradients=sum(p.numel() for p in model.parameters() if p.requires_grad),
        gflops=count_gflops(config) if config else float("nan"),
        size_mb=(os.path.getsize(checkpoint) / 1e6) if checkpoint and os.path.isfile(checkpoint)
        else params * 4 / 1e6,
        img_size=getattr(model, "img_size", None),
    )


def format_summary(s: dict[str, Any]) -> str:
    """One line, as Ultralytics prints it, with GFLOPs and the file size."""
    line = (f"{s['name']} summary: {s['layers']:,} layers, {s['parameters']:,} parameters, "
            f"{s['gradients']:,} gradients, {s['gflops']:.1f} GFLOPs, {s['size_mb']:.1f} MB")
    return line + (f" - {s['description']}" if s.get("description") else "")


def layer_table(model: nn.Module) -> str:
    """Per-module table of ``info(detailed=True)``: each top-level component and its children."""
    rows = [f"{'module':<45} {'type':<24} {'params':>12}"]
    for name, mod in model.named_modules():
        if name.count(".") > 1 or not name:
            continue
        n = sum(p.numel() for p in mod.parameters())
        rows.append(f"{name:<45} {type(mod).__name__:<24} {n:>12,}")
    return "\n".join(rows)
