"""The ``segany train`` and ``segany val`` commands (options are those of :func:`train` / :func:`val`)."""

from __future__ import annotations

import inspect
from typing import Any

TRAIN_HELP = """\
usage: segany train model=sam_b data=path/to/dataset [key=value ...]
       segany train resume=runs/train/exp        (goes on with that run's model, data and settings)

Fine-tune a SAM model with prompts simulated from the ground truth (noisy boxes, points, corrective
clicks); loss focal + dice (20:1) + IoU MSE; AdamW with warm-up + cosine; checkpoints last.pt /
best.pt (plain state dicts) and last_state.pt in project/name (default runs/train/exp*).
  model          registry architecture for fresh weights (sam_b, mobile_sam) or a checkpoint
  data           COCO .json (polygons or RLE), YOLO-seg folder (images/ + labels/), or synthetic:N:SEED
  epochs 10, batch 2, lr 1e-4, weight_decay 0.01, warmup 0.05 (fraction of steps), grad_clip 1.0
  imgsz          input size of a fresh model (checkpoints train at their own size)
  trainable      decoder (default), prompt+decoder or all
  max_instances 8, click_rounds 1, box_prob 0.5   prompts per image, corrective clicks, box share
  val_data       dataset that picks best.pt by mIoU (val_max_images 50)
  device '', amp true (GPU only), seed 0, threads, project runs/train, name exp, exist_ok false
  workers        processes making samples (default 0 on CPU, up to 8 on GPU)    verbose true
  resume         true (project/name) or the run folder / its last.pt; model, data and the settings
                 left out are the run's (others must agree with them)"""

VAL_HELP = """\
usage: segany val model=path/to/checkpoint data=path/to/dataset [key=value ...]

mIoU per ground-truth instance with one box, one point (best of 3 outputs, highest predicted IoU,
single output) and n_points points (corrective clicks), as the SAM paper evaluates.
  model          checkpoint (or a registry architecture name for fresh weights)
  data           COCO .json, YOLO-seg folder, or synthetic:N:SEED
  kinds          box,point,points (default), or everything too    n_points 3
  max_images, max_instances   limits             save_json   write the figures to this file
  device '', threads, verbose true"""

TYPES: dict[str, Any] = dict(imgsz=1024, val_data="", val_max_images=50, threads=1, save_json="", max_images=1,
                             max_instances=1)


def _options(fn, skip: set[str]) -> dict[str, Any]:
    return {p.name: (None if p.default is p.empty else p.default)
            for p in inspect.signature(fn).parameters.values() if p.name not in skip}


def run_train(tokens: list[str]) -> int:
    from ..cli import parse_options
    from .trainer import train

    valid = _options(train, {"on_epoch_end"})
    valid["resume"] = None  # true or a path
    valid["model"] = ""
    opts = parse_options(tokens, valid, types=TYPES, command="train")
    # model= and data= are checked by train (a ConfigError, exit 2): a resumed run takes its own.
    if not opts.get("resume"):
        opts.pop("resume", None)
    out = train(**opts)
    print(f"checkpoints: {out['last']} (last), {out['best']} (best); state: {out['save_dir']}/last_state.pt")
    return 0


def run_val(tokens: list[str]) -> int:
    from ..cli import UsageError, parse_options
    from .validate import val

    valid = _options(val, {"runner"})
    valid["kinds"] = None
    opts = parse_options(tokens, valid, types=TYPES, command="val")
    if opts.get("data") is None or opts.get("model") is None:
        raise UsageError("val needs model=checkpoint and data=path/to/dataset")
    if opts.get("kinds") is not None:
        kinds = opts["kinds"]
        opts["kinds"] = tuple(kinds.split(",") if isinstance(kinds, str) else kinds)
    else:
        opts.pop("kinds", None)
    val(**opts)
    return 0
