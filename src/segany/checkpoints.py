"""Checkpoint files: safe loading, architecture recognition from the tensors, strict state-dict loading.

A checkpoint is a plain state dict or ``{"model": state_dict}``. The architecture is read off the
tensors (key names and shapes), never off the file name, so renamed, fine-tuned and custom-size
SAM files load with no config file.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotAvailableError,
    StateDictMismatchError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
)
from .models.registry import MODELS, SAM_DECODER, ModelConfig, build_model

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Load the tensors of a checkpoint file with ``weights_only=True`` (no code can run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: '{path}'")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"checkpoint '{path}' is empty (0 bytes): download it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise UnsafeCheckpointError(
                f"refused to load '{path}': the file is a pickle that needs to run code to load "
                f"(it is not a plain tensor checkpoint), and segany only loads tensors "
                f"(torch.load(weights_only=True)). If you trust the file, re-save its state dict with "
                f"torch.save(model.state_dict(), 'clean.pt') and load that."
            ) from None
        raise CorruptCheckpointError(f"'{path}' is not a PyTorch checkpoint ({_short(e)})") from None
    except Exception as e:  # a damaged file fails anywhere inside the unpickler, with any exception
        raise CorruptCheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint: it is truncated, damaged or another kind "
            f"of file ({_short(e)}). Download it again."
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(
            f"'{path}' holds no state dict (expected a dict of tensors or {{'model': state_dict}}, "
            f"found {type(obj).__name__})"
        )
    # Weights saved from a wrapper (DataParallel, torch.compile) carry a prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def infer_config(sd: StateDict, name: str = "custom") -> ModelConfig:
    """Recognise the architecture of a state dict and return its :class:`ModelConfig`.

    The registry entry is returned when the tensors match one exactly (so ``info()`` can say
    ``sam_b``), otherwise a custom config read off the shapes.
    """
    if any(k.startswith(("image_encoder.trunk.", "memory_attention.", "sam_mask_decoder.")) for k in sd):
        raise NotAvailableError(
            "this is a SAM 2 / SAM 2.1 checkpoint; SAM 2 models are not supported by this version of segany yet"
        )
    if "image_encoder.patch_embed.proj.weight" in sd:
        family, params = "sam_vit", {"encoder": _vit_encoder_params(sd), **_decoder_params(sd)}
    elif "image_encoder.patch_embed.seq.0.c.weight" in sd:
        family, params = "mobile_sam", {"encoder": _tiny_vit_params(sd), **_decoder_params(sd)}
    else:
        sample = ", ".join(list(sd)[:5])
        raise UnknownArchitectureError(
            f"the tensors match no known architecture (first keys: {sample}). Supported: SAM ViT-B/L/H "
            f"and custom ViT sizes, MobileSAM ({', '.join(MODELS)})."
        )
    for cfg in MODELS.values():
        if cfg.family == family and _same(cfg.params, params):
            return cfg
    return ModelConfig(name=name, family=family, params=params, description=f"custom {family}")


def _same(a: dict, b: dict) -> bool:
    norm = lambda d: {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}  # noqa: E731
    return norm({**a, "encoder": norm(a["encoder"])}) == norm({**b, "encoder": norm(b["encoder"])})


def _count(sd: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _vit_encoder_params(sd: StateDict) -> dict[str, Any]:
    patch = sd["image_encoder.patch_embed.proj.weight"]  # (embed_dim, 3, p, p)
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
    pos = sd.get("image_encoder.pos_embed")  # (1, S/p, S/p, C)
    img_size = pos.shape[1] * patch_size if pos is not None else 1024
    grid = img_size // patch_size
    rel = [sd.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    use_rel_pos = rel[0] is not None
    if use_rel_pos:
        head_dim = rel[0].shape[1]
        global_idx = tuple(i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1)
        windowed = [r.shape[0] for r in rel if r.shape[0] != 2 * grid - 1]
        window_size = (windowed[0] + 1) // 2 if windowed else 14
    else:  # without relative positions, neither head count nor windows show in the tensors
        head_dim, global_idx, window_size = 64, (), 14
    mlp_dim = sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
    return dict(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_ratio=mlp_dim / embed_dim,
        window_size=window_size,
        global_attn_indexes=global_idx,
        **({} if use_rel_pos else {"use_rel_pos": False}),
        **({} if pos is not None else {"use_abs_pos": False}),
        **({} if "image_encoder.blocks.0.attn.qkv.bias" in sd else {"qkv_bias": False}),
    )


def _tiny_vit_params(sd: StateDict) -> dict[str, Any]:
    n_layers = _count(sd, r"image_encoder\.layers\.(\d+)\.")
    depths = tuple(_count(sd, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n_layers))
    embed_dims = [sd["image_encoder.patch_embed.seq.2.c.weight"].shape[0]]
    heads, windows = [], []
    for i in range(1, n_layers):
        embed_dims.append(sd[f"image_encoder.layers.{i}.blocks.0.attn.norm.weight"].shape[0])
        bias = sd[f"image_encoder.layers.{i}.blocks.0.attn.attention_biases"]  # (heads, ws*ws)
        heads.append(bias.shape[0])
        windows.append(round(bias.shape[1] ** 0.5))
    expand = sd["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[0] / embed_dims[0]
    mlp_ratio = sd["image_encoder.layers.1.blocks.0.mlp.fc1.weight"].shape[0] / embed_dims[1]
    head = sd.get("image_encoder.head.weight")
    # Stage 0 is convolutional; its head count and window size are unused but kept as MobileSAM's.
    return dict(
        img_size=1024,  # TinyViT holds no positional table: the size does not show in the tensors
        embed_dims=tuple(embed_dims),
        depths=depths,
        num_heads=(max(1, embed_dims[0] // 32), *heads),
        window_sizes=(windows[0], *windows),
        mlp_ratio=mlp_ratio,
        mbconv_expand_ratio=expand,
        local_conv_size=sd["image_encoder.layers.1.blocks.0.local_conv.c.weight"].shape[-1],
        num_classes=head.shape[0] if head is not None else 1000,
    )


def _decoder_params(sd: StateDict) -> dict[str, Any]:
    dim = sd["prompt_encoder.no_mask_embed.weight"].shape[1]
    iou_layers = _count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")
    return dict(
        SAM_DECODER,
        prompt_embed_dim=dim,
        mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=iou_layers,
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )


def load_state_dict_strict(model: nn.Module, sd: StateDict, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names missing, unexpected and misshaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label}: {', '.join(keys[:8])}{more}")
        raise StateDictMismatchError(
            f"'{source}' does not fit the architecture it was recognised as; " + "; ".join(parts)
            + ". The file is damaged or was saved from a modified model."
        )
    model.load_state_dict(sd, strict=True)


def load_model(path: str | os.PathLike, name: str | None = None) -> tuple[nn.Module, ModelConfig]:
    """Read a checkpoint file, recognise its architecture, build the model and load the weights (eval mode)."""
    sd = read_state_dict(path)
    config = infer_config(sd, name=name or Path(path).stem)
    model = build_model(config)
    load_state_dict_strict(model, sd, str(path))
    return model.eval(), config


def config_with(config: ModelConfig, **encoder_changes: Any) -> ModelConfig:
    """A copy of ``config`` with some encoder parameters changed (small test models, custom sizes)."""
    params = {**config.params, "encoder": {**config.params["encoder"], **encoder_changes}}
    return dataclasses.replace(config, name=f"{config.name}-custom", params=params)
