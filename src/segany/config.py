"""Every option a prediction takes, its default, and strict validation (a typo is an error).

The Python API (``SAM``, ``Predictor``) and the CLI both read :data:`DEFAULTS`.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Any

import numpy as np

from .errors import ConfigError

# Prediction options (Ultralytics names where the seed uses them).
# Used wherever no model is named: the small demo model that ships inside the package, so a fresh
# install segments offline (models/registry.py, "segany_tiny").
DEFAULT_MODEL = "segany_tiny.pt"

PREDICT_DEFAULTS: dict[str, Any] = dict(
    model=None,
    task="segment",
    mode="predict",
    source=None,
    imgsz=None,  # None = the model's own input size (1024 for every official model)
    device="",
    half=False,
    compile=False,  # torch.compile the image encoder: slow first call, faster after (GPU)
    conf=None,  # segment-everything only: a minimum predicted IoU on top of conf_thres (None = none)
    batch=None,  # images per encoder pass; None = 1 on CPU, 8 on GPU
    multimask_output=False,
    retina_masks=True,  # masks are always returned at the original size
    stream=False,
    verbose=False,  # a line per image on stdout (the command line's default is True)
    save=False,
    save_txt=False,
    save_conf=False,
    project=None,
    name=None,
    exist_ok=False,
    vid_stride=1,
    show=False,
)

# Segment-everything options (Ultralytics name, with Meta's name as an alias).
EVERYTHING_DEFAULTS: dict[str, Any] = dict(
    points_stride=32,
    points_batch_size=64,
    crop_n_layers=0,
    crop_overlap_ratio=512 / 1500,
    crop_downscale_factor=1,
    point_grids=None,
    conf_thres=0.88,
    stability_score_thresh=0.95,
    stability_score_offset=1.0,
    iou=0.7,
    crop_nms_thresh=0.7,
    min_mask_region_area=0,
    use_m2m=False,  # SAM 2's mask-to-mask refinement: each mask decoded again with itself as the mask prompt
)
META_ALIASES: dict[str, str] = dict(
    points_per_side="points_stride",
    points_per_batch="points_batch_size",
    crop_n_points_downscale_factor="crop_downscale_factor",
    pred_iou_thresh="conf_thres",
    box_nms_thresh="iou",
)

DEFAULTS: dict[str, Any] = {**PREDICT_DEFAULTS, **EVERYTHING_DEFAULTS}


def suggest(key: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """' Did you mean 'x'?' for the nearest valid name, or ''."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


# Example values giving the type of the options whose default is None.
OPTION_TYPES: dict[str, Any] = dict(imgsz=1024, batch=1, model="", project="", name="", conf=0.5)
# Options that count something: whole numbers from 1.
COUNTS = {"imgsz", "batch", "vid_stride"}
# The prompts a prediction takes besides its options (named arguments of the calls).
PROMPTS = ("bboxes", "points", "labels", "masks")
# The only task and mode a SAM predictor has (Ultralytics' overrides name them).
FIXED = dict(task="segment", mode="predict")


def check_type(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (booleans for flags, whole numbers for int options,
    numbers for float ones, single values for strings), or a :class:`ConfigError` naming the option."""
    if key == "imgsz" and isinstance(value, (list, tuple)) and default is not None:
        # [h, w] (Ultralytics' form): each a whole number here; SAM's predictor wants them equal
        # (check_options), a detector's need not be.
        return [check_type(key, v, default) for v in value]
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return bool(value)
    is_number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if isinstance(default, int):
        if not is_number or not float(value).is_integer():
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(value)
    if isinstance(default, float):
        if not is_number:
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, (list, tuple, dict, bool)):
            raise ConfigError(f"{key}={value!r}: expected a single value, not a list or boolean")
        return str(value)  # device=0, name=1, a Path: strings
    return value


def _square_size(key: str, value: list | tuple) -> Any:
    """Ultralytics' ``imgsz=[h, w]`` form: SAM's input is square, so ``[s, s]`` → ``s``."""
    if len(value) == 2 and value[0] == value[1]:
        return value[0]
    raise ConfigError(f"{key}={list(value)!r}: SAM models take a square input; give one size, e.g. {key}=1024")


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate option names (Meta aliases resolved to segany's names) and the values of the
    prediction options; an unknown name or a value of the wrong type is a :class:`ConfigError`.
    (Segment-everything values are checked with the rest of them, ``engine.everything``.)"""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # canonical name → the name the caller used
    valid = set(DEFAULTS) | set(META_ALIASES)
    for key, value in options.items():
        if key not in valid:
            raise ConfigError(f"unknown option '{key}'.{suggest(key, valid | set(PROMPTS))} Valid options: {', '.join(sorted(DEFAULTS))}"
                              " (prompts: bboxes, points, labels, masks)")
        canonical = META_ALIASES.get(key, key)
        if canonical in out:
            raise ConfigError(f"'{given_as[canonical]}' and '{key}' are the same option; give only one")
        given_as[canonical] = key
        if canonical in PREDICT_DEFAULTS:
            value = check_type(key, value, OPTION_TYPES.get(canonical, PREDICT_DEFAULTS[canonical]))
            if canonical == "imgsz" and isinstance(value, list):
                value = _square_size(key, value)
            if canonical in COUNTS and value is not None and value < 1:
                raise ConfigError(f"{key}={value}: expected an integer >= 1")
            if canonical == "conf" and value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"conf={value}: expected a predicted IoU in [0, 1] (or None for no filter)")
            if canonical in FIXED and value != FIXED[canonical]:
                raise ConfigError(f"{key}={value!r}: a SAM predictor only does {key}={FIXED[canonical]!r}")
        out[canonical] = value
    return out
