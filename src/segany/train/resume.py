"""Resuming a training run: its folder, the settings, model and data it recorded, and its
``last.pt`` checked against ``last_state.pt`` (see :func:`segany.train.trainer.train`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import read_state_dict
from ..errors import ConfigError, StateDictMismatchError, short_reason


def saved_run(resume: bool | str | os.PathLike, project: Any, name: str) -> tuple[Path, dict[str, Any]]:
    """The run folder that ``resume`` names (``True``: ``project/name``; a folder or a file in it)
    and its ``last_state.pt``."""
    run_dir = Path(project) / name if resume is True else Path(resume)
    run_dir = run_dir.parent if run_dir.suffix == ".pt" else run_dir
    if not (run_dir / "last_state.pt").is_file() or not (run_dir / "last.pt").is_file():
        raise ConfigError(f"resume: {run_dir} holds no run to continue (last.pt and last_state.pt); "
                          "give the run folder, or start a new run without resume")
    return run_dir, torch.load(run_dir / "last_state.pt", map_location="cpu", weights_only=True)


def record_name(source: Any) -> str | None:
    """How ``model=`` / ``data=`` is recorded for a resumed run to find it again: a path that exists
    as an absolute path (the resume may start in another folder), other text (``sam_b.pt``,
    ``synthetic:N``) as it is, a :class:`segany.SAM` as its checkpoint file, an object that no name
    reloads (a module, a dataset built in Python) as ``None``."""
    source = getattr(source, "ckpt_path", source)  # segany.SAM
    if not isinstance(source, (str, os.PathLike)) or source == "":
        return None
    return os.path.abspath(source) if os.path.exists(source) else os.fspath(source)


def _recorded(saved: dict[str, Any], key: str) -> str | None:
    """The name the run recorded for ``model`` / ``data``, or ``None``. Older runs wrote an
    object's text there (``<...Dataset object at 0x...>``), which names nothing."""
    value = saved.get(key)
    return value if isinstance(value, str) and value[:1] not in ("<", "[") else None


def recorded_data(saved: dict[str, Any], run_dir: Path) -> str:
    """The dataset of the run being resumed, as it recorded it."""
    data = _recorded(saved, "data")
    if data is None:
        raise ConfigError(f"resume: {run_dir} does not record the dataset it was trained on (it was given as "
                          "a Python object, or by an older segany); pass data= with that dataset")
    return data


def _same_source(given: str, recorded: str) -> bool:
    """Two names of one model or dataset (the same text, or paths to the same file or folder)."""
    if given == recorded:
        return True
    try:
        return os.path.samefile(given, recorded)
    except OSError:  # one of them is not a path that exists: a name, compared as text above
        return False


def resumed_settings(given: dict[str, Any], saved: dict[str, Any], model: Any, data: Any,
                     run_dir: Path, defaults: dict[str, Any]) -> dict[str, Any]:
    """``given`` with the values the run recorded, refused where one given differs from the run's
    (one left at its default takes the run's). ``model`` and ``data`` given as names are checked
    the same way; the run's own ``last.pt`` is its model too."""
    changed = {k: (v, saved[k]) for k, v in given.items() if k in saved and saved[k] != v and v != defaults[k]}
    also = {"model": (os.fspath(run_dir / "last.pt"),), "data": ()}
    for key, value in (("model", model), ("data", data)):
        recorded = _recorded(saved, key)
        # Only names are compared: an object given (a module, a dataset) has none; a module is
        # checked by the strict load of last.pt into it.
        if isinstance(value, (str, os.PathLike)) and value != "" and recorded is not None:
            name = record_name(value)
            if not any(_same_source(name, other) for other in (recorded, *also[key])):
                changed[key] = (os.fspath(value), recorded)
    if changed:
        raise ConfigError("resume continues a run with its own settings, and these differ from it: "
                          + ", ".join(f"{k}={v!r} (the run has {was!r})" for k, (v, was) in changed.items())
                          + "; leave them out, or start a new run")
    return {k: saved.get(k, v) for k, v in given.items()}


def load_last(net: nn.Module, run_dir: Path, state: dict[str, Any], loaded: bool) -> None:
    """Put the run's ``last.pt`` into ``net`` (already there when ``loaded``), checking that it is
    the epoch ``last_state.pt`` records."""
    last = net.state_dict() if loaded else read_state_dict(run_dir / "last.pt")
    # The two files are written one after the other: a run stopped between them would resume
    # one epoch's weights with another epoch's optimizer.
    if "weights_sum" in state and state["weights_sum"] != weights_sum(last):
        raise ConfigError(f"resume: {run_dir}'s last.pt and last_state.pt are from different epochs (the run "
                          "stopped while saving); resume from an earlier copy or start a new run")
    if loaded:
        return
    try:
        net.load_state_dict(last, strict=True)
    except RuntimeError as e:
        raise StateDictMismatchError(f"resume: {run_dir / 'last.pt'} is not a checkpoint of this model "
                                     f"({short_reason(e)})") from None


def weights_sum(sd: dict[str, torch.Tensor]) -> float:
    """A fingerprint of a state dict (the sum of all its values, in float64)."""
    return float(sum(t.double().sum() for t in sd.values() if t.is_floating_point()))
