"""What training and validation share: resolving ``model=``, run folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..models.registry import ModelConfig


def resolve_model(model: Any, imgsz: int | None = None, training: bool = True) -> tuple[nn.Module, ModelConfig]:
    """``model=`` as users give it → ``(Sam, config)``; ``training=False`` (validation) also
    takes SAM 2 checkpoints.

    A registry architecture name without a file suffix (``sam_b``, ``mobile_sam``) builds that
    architecture with fresh weights (``imgsz`` sets its input size); anything else is a
    checkpoint (path or weights name such as ``sam_b.pt``), loaded as :class:`segany.SAM` does.
    A :class:`segany.SAM` or an ``nn.Module`` is used as it is.
    """
    from ..checkpoints import config_with, infer_config, load_model
    from ..models.registry import MODELS, build_model

    if hasattr(model, "predictor") and hasattr(model, "config"):  # segany.SAM
        return model.model, model.config
    if isinstance(model, nn.Module):
        return model, infer_config(model.state_dict())
    name = str(model)
    if name in MODELS and not Path(name).exists():
        config = MODELS[name]
        if training and config.family not in ("sam_vit", "mobile_sam"):
            raise ConfigError(f"training supports SAM (ViT) and MobileSAM architectures, not {config.family}")
        if imgsz and imgsz != config.params["encoder"]["img_size"]:
            config = config_with(config, img_size=int(imgsz))
        return build_model(config), config
    from ..hub import resolve_weights

    net, config = load_model(resolve_weights(name), name=Path(name).stem)
    if config.family == "sam2" and training:
        raise ConfigError("training supports SAM (ViT) and MobileSAM checkpoints; SAM 2 is not supported yet")
    if imgsz and imgsz != net.img_size:
        raise ConfigError(f"imgsz={imgsz} differs from the checkpoint's input size {net.img_size}; "
                         "a checkpoint trains at its own size")
    return net, config


def next_run_dir(project: str | os.PathLike, name: str, exist_ok: bool) -> Path:
    """``project/name``, or ``name2``, ``name3`` ... when it exists (unless ``exist_ok``), made."""
    from ..engine.saving import run_dir

    path = run_dir(str(project), name, exist_ok)
    path.mkdir(parents=True, exist_ok=True)
    return path
