"""Every option a prediction takes, its default, and strict validation (a typo is an error).

The Python API (``SAM``, ``Predictor``) and the CLI both read :data:`DEFAULTS`.
"""

from __future__ import annotations

import difflib
from typing import Any

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
    conf=0.25,
    batch=None,  # images per encoder pass; None = 1 on CPU, 8 on GPU
    multimask_output=False,
    retina_masks=True,  # masks are always returned at the original size
    stream=False,
    verbose=True,
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


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate option names (Meta aliases resolved to segany's names); unknown names are an error."""
    out: dict[str, Any] = {}
    valid = set(DEFAULTS) | set(META_ALIASES)
    for key, value in options.items():
        if key not in valid:
            raise ConfigError(f"unknown option '{key}'.{suggest(key, valid)} Valid options: {', '.join(sorted(DEFAULTS))}")
        canonical = META_ALIASES.get(key, key)
        if canonical in out and canonical != key:
            raise ConfigError(f"'{key}' and '{canonical}' are the same option; give only one")
        out[canonical] = value
    return out
