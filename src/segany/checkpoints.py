"""Checkpoint files: safe loading, strict state-dict loading, building the model.

A checkpoint is a plain state dict or ``{"model": state_dict}``. The architecture is read off the
tensors (key names and shapes, :mod:`segany.recognition`), never off the file name, so renamed,
fine-tuned and custom-size SAM files load with no config file.
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

from .errors import (CheckpointNotFoundError, CorruptCheckpointError, StateDictMismatchError, UnsafeCheckpointError,
                     short_reason, warn)
from .models.registry import ModelConfig, build_model
from .recognition import RecognitionNotes, StateDict, infer_config, recognise

__all__ = ["read_state_dict", "infer_config", "load_state_dict_strict", "load_model", "config_with"]


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
        # "Unsupported global": the pickle names a class or function to call. Other refusals
        # (an unknown opcode) come from bytes that are no torch.save archive at all.
        if "global" in str(e).lower() or "unsupported class" in str(e).lower():
            raise UnsafeCheckpointError(
                f"refused to load '{path}': the file is a pickle that needs to run code to load "
                f"(it is not a plain tensor checkpoint), and segany only loads tensors "
                f"(torch.load(weights_only=True)). If you trust the file, re-save its state dict with "
                f"torch.save(model.state_dict(), 'clean.pt') and load that."
            ) from None
        detail = re.search(r"Unsupported operand \d+", str(e))
        raise CorruptCheckpointError(
            f"'{path}' is not a PyTorch checkpoint: it is another kind of file, or damaged "
            f"({detail.group(0) if detail else short_reason(e)}). Checkpoints are files written by torch.save."
        ) from None
    except Exception as e:  # a damaged file fails anywhere inside the unpickler, with any exception
        raise CorruptCheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint: it is truncated, damaged or another kind "
            f"of file ({type(e).__name__}: {short_reason(e)}). Download it again."
        ) from None
    sd = _unwrap(obj, path)
    _check_finite(sd, path)
    return sd


def _check_finite(sd: StateDict, path: Path) -> None:
    """A NaN or infinity in a weight is a :class:`CorruptCheckpointError` naming the tensors.

    ``torch.load`` does not check the zip's CRCs: damaged bytes load silently as garbage (often NaN).
    A sum is finite only if every element is, so one sum per tensor screens it (ViT-B, 94 M
    parameters: ~30 ms on 2 CPU threads, against 0.4-0.8 s for ``isfinite(t).all()``); a non-finite
    sum may be an overflow of large finite values, so only then is the tensor checked element-wise.
    """
    bad = [k for k, t in sd.items() if t.is_floating_point() and t.numel()
           and not torch.isfinite(t.sum()) and not torch.isfinite(t).all()]
    if bad:
        more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        raise CorruptCheckpointError(
            f"'{path}' is damaged: tensors hold NaN or infinite values: {', '.join(bad[:8])}{more}. Its bytes "
            f"were most likely changed by an interrupted or corrupted download or a disk error (torch.load does "
            f"not verify them). Delete the file (from the weights cache too) and download it again; if you "
            f"saved it yourself, the training that wrote it diverged."
        )


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = type(obj).__name__
        if isinstance(obj, dict):
            keys = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:6]
            found = f"a dict whose entries {', '.join(map(repr, keys))} are not tensors" if keys else "an empty dict"
        raise CorruptCheckpointError(
            f"'{path}' holds no state dict (expected a dict of tensors or {{'model': state_dict}}, found "
            f"{found}). If the weights sit under another key, re-save them: "
            f"torch.save(ckpt['<key>'], 'weights.pt')"
        )
    # Weights saved from a wrapper (DataParallel, torch.compile) carry a prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_state_dict_strict(model: nn.Module, sd: StateDict, source: str, absent: tuple[str, ...] = ()) -> None:
    """``load_state_dict(strict=True)`` with an error that names missing, unexpected and misshaped keys.

    ``absent`` (:class:`RecognitionNotes`): if the load fails on shapes or unexpected keys, these were lost, not
    left out, and the model was built as another size: they lead the error, the consequences are cut short.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in sd and sd[k].shape != own[k].shape]
    lost = [k for k in dict.fromkeys(absent) if k not in own] if unexpected or misshaped else []
    if missing or unexpected or misshaped:
        parts, shown = [], 2 if lost else 8
        if lost:
            parts.append(f"missing keys: {', '.join(lost + missing)} (the architecture is read from these; "
                         "without them the file was taken for another one, and the mismatches below follow)")
        for label, keys in (("missing keys", [] if lost else missing), ("unexpected keys", unexpected),
                            ("wrong shapes", misshaped)):
            if keys:
                more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
                parts.append(f"{label}: {', '.join(keys[:shown])}{more}")
        raise StateDictMismatchError(
            f"'{source}' does not fit the architecture it was recognised as; " + "; ".join(parts)
            + ". The file is damaged or was saved from a modified model."
        )
    model.load_state_dict(sd, strict=True)


def load_model(path: str | os.PathLike, name: str | None = None,
               config: ModelConfig | None = None) -> tuple[nn.Module, ModelConfig]:
    """Read a checkpoint file, recognise its architecture, build the model and load the weights (eval mode).

    ``config`` replaces recognition, for what the tensors cannot tell (a custom SAM 2's head count,
    global blocks, windows and input size): ``config_with(infer_config(read_state_dict(path)), ...)``.
    """
    sd = read_state_dict(path)
    notes = RecognitionNotes()
    if config is None:
        config = recognise(sd, name or Path(path).stem, notes)
    try:
        model = build_model(config)
    except (ValueError, ZeroDivisionError, RuntimeError, TypeError) as e:  # shapes no model can have
        raise StateDictMismatchError(
            f"'{path}' has tensors of shapes no {config.family} model can be built from "
            f"({type(e).__name__}: {short_reason(e)}): the file is damaged or was saved from a modified model") from None
    load_state_dict_strict(model, sd, str(path), tuple(notes.absent))
    if notes.assumed:  # after the load: a file that does not load gets its error alone
        enc, given = config.params["encoder"], ", ".join(f"{k}={v!r}" for k, v in notes.assumed.items())
        warn(f"'{path}' is a custom-size SAM 2 (Hiera width {enc['embed_dim']}, stages {enc['stages']}): its "
             f"head count, global-attention blocks, window sizes (but the first) and input size are not in the "
             f"tensors, so Hiera-T's pattern was assumed: {given}. If the model was made with other values, "
             f"its outputs are wrong: load it with SAM(path, config=config_with(infer_config(read_state_dict(path)), "
             f"num_heads=..., global_att_blocks=..., img_size=...)) (from segany.checkpoints).")
    return model.eval(), config


def config_with(config: ModelConfig, **encoder_changes: Any) -> ModelConfig:
    """A copy of ``config`` with some encoder parameters changed (small test models, custom sizes)."""
    params = {**config.params, "encoder": {**config.params["encoder"], **encoder_changes}}
    return dataclasses.replace(config, name=f"{config.name}-custom", params=params)
