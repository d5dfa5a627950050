"""The commands of the ``segany`` command line: ``predict``, ``info``, ``annotate``
(``benchmark`` is in :mod:`segany.benchmark`).

Each ``run_*`` takes the option tokens after the command name and returns the exit status;
errors propagate to :func:`segany.cli.main`, which turns them into one line and an exit status.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cli import TEXT_OPTIONS, UsageError, parse_options, split_args
from .config import DEFAULT_MODEL
from .engine.saving import RunWriter
from .errors import SkippedImageWarning

# ---------------------------------------------------------------------------------------- info

INFO_DEFAULTS: dict[str, Any] = dict(model=DEFAULT_MODEL, detailed=False, device="")
INFO_HELP = """\
usage: segany info [model=segany_tiny.pt] [detailed=False] [device='']

Print the model summary line: layers, parameters, gradients, GFLOPs at the working image size
and checkpoint size in MB. detailed=True adds a per-module table.
  model     checkpoint name (sam_b.pt, sam_l.pt, sam_h.pt, mobile_sam.pt, sam2.1_t.pt, ...) or path;
            default segany_tiny.pt, the bundled demo model
  detailed  add the per-module table
  device    '', 'cpu', 'cuda:0', ..."""


def run_info(tokens: list[str]) -> int:
    opts = {**INFO_DEFAULTS, **parse_options(tokens, INFO_DEFAULTS, command="info")}
    from .model import SAM

    SAM(str(opts["model"]), device=opts["device"]).info(detailed=bool(opts["detailed"]))
    return 0


# --------------------------------------------------------------------------------------- serve


def serve_command():
    """The ``serve`` command's module (:mod:`segany.serve.command`; FastAPI is imported only to run it)."""
    from .serve import command

    return command


# ---------------------------------------------------------------------------------- train, val


def train_command():
    """The ``train`` / ``val`` commands' module (:mod:`segany.train.command`)."""
    from .train import command

    return command


# ------------------------------------------------------------------------------------ annotate

ANNOTATE_HELP = """\
usage: segany annotate data=path/to/images [det_model=yolo11x.pt] [sam_model=sam_b.pt] [key=value ...]

Auto-annotate a folder: boxes from a detector (or existing labels) are prompted into SAM, and one
YOLO-seg label file per image is written to output_dir (default <data>_auto_annotate_labels).
  data        folder of images (required)       det_model  detector weights (yolo11x.pt)
  sam_model   SAM checkpoint (sam_b.pt)         device     '', 'cpu', 'cuda:0', ...
  conf 0.25, iou 0.45, imgsz 640, max_det 300   detector settings
  classes     class ids to keep, e.g. 0,2       output_dir where the labels go
  labels      boxes from YOLO box labels (folder) or a COCO .json instead of a detector (det_model=None)
  format      yolo (default) or coco            overwrite  redo images whose labels exist
Further options are those of segany.auto_annotate. Exit status 1 when an image failed."""


def _annotate_defaults(fn) -> tuple[dict[str, Any], bool]:
    """Option names and defaults from ``auto_annotate``'s signature; True if it takes ``**kwargs``."""
    import inspect

    out: dict[str, Any] = {}
    var_kw = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            out[p.name] = None if p.default is p.empty else p.default
    return out, var_kw


def run_annotate(tokens: list[str]) -> int:
    import importlib

    from .errors import NotAvailableError

    try:
        module = importlib.import_module("segany.annotate")
    except ModuleNotFoundError as e:
        if e.name != "segany.annotate":
            raise
        raise NotAvailableError("annotate is not available in this version of segany "
                                "(the segany.annotate module is missing)") from None
    fn = module.auto_annotate
    defaults, var_kw = _annotate_defaults(fn)
    valid = dict(defaults)
    if var_kw:  # extra keys go to auto_annotate, which checks them itself
        for key, _ in split_args(tokens, {k for k, v in defaults.items() if isinstance(v, bool)}, set(defaults)):
            valid.setdefault(key, None)
    opts = parse_options(tokens, valid, command="annotate", texts=TEXT_OPTIONS | {"labels"})  # labels: a path here
    if opts.get("data") is None:
        raise UsageError("annotate needs data=path/to/images")
    summary = fn(**opts)
    failed = getattr(summary, "failed", None)
    if failed:  # the run went on past them, but a script must know
        print(f"segany: error: {len(failed)} image(s) failed, listed above; a rerun retries them", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------- predict

PROMPT_DEFAULTS: dict[str, Any] = dict(bboxes=None, points=None, labels=None, masks=None)
# Options the command line handles itself rather than passing to SAM.predict.
CLI_HANDLED = {"model", "source", "device", "save", "save_txt", "save_conf", "project", "name", "exist_ok",
               "show", "stream", "verbose", *PROMPT_DEFAULTS}
PREDICT_NOTES = dict(
    model="checkpoint name (sam_b.pt, sam_l.pt, sam_h.pt, mobile_sam.pt, sam2_t.pt, ...) or path",
    source="image, folder, glob, video or URL (default: the bundled example image)",
    bboxes="box prompts x1,y1,x2,y2: [439,437,524,709] or [[..],[..]]",
    points="point prompts: [900,370], [[400,370],[900,370]] (2 objects) or [[[400,370],[900,370]]]",
    labels="1 positive / 0 negative per point, shaped like points: [1,1] or [[1,0]]",
    masks="mask prompt: a .npy file (256x256 logits or a binary mask) or a mask image (white = object)",
    multimask_output="3 candidate masks per prompt, best first",
    imgsz="model input size (default: the model's own)",
    device="'' (best available), cpu, cuda:0, mps",
    half="bf16 autocast on a GPU or a CPU with bf16 units (elsewhere fp32, with a warning)",
    conf="minimum predicted IoU kept by segment-everything, on top of conf_thres",
    batch="images per encoder pass (default 1 on CPU, 8 on GPU)",
    save="annotated image + JSON of the masks (COCO RLE) per image",
    save_txt="YOLO-seg labels in <dir>/labels/", save_conf="add the score to each label line",
    project="output folder (default runs/segment)", name="run name (default predict, predict2, ...)",
    exist_ok="reuse an existing run folder", vid_stride="keep every N-th video frame",
    verbose="print a line per image",
    compile="torch.compile the image encoder: a slow first image, faster after (long GPU runs)",
    stream="(results are always streamed to disk by the command line)",
    retina_masks="(masks are always at the original image size)",
    show="(ignored: results are saved instead)",
)


def predict_defaults() -> dict[str, Any]:
    """Every predict option and its command-line default (``save`` and ``verbose`` are on, unlike
    the Python API)."""
    from .config import DEFAULTS

    # task/mode are fixed for SAM; leaving them out also keeps 'modle' suggesting 'model'.
    options = {k: v for k, v in DEFAULTS.items() if k not in ("task", "mode")}
    return {**options, "model": DEFAULT_MODEL, "save": True, "verbose": True, **PROMPT_DEFAULTS}


def predict_help() -> str:
    from .config import EVERYTHING_DEFAULTS, META_ALIASES
    from .models.registry import MODELS

    tuned = MODELS[Path(DEFAULT_MODEL).stem].extra.get("defaults", {})  # the default model's own

    defaults = predict_defaults()
    skip = set(EVERYTHING_DEFAULTS)
    alias_of = {v: k for k, v in META_ALIASES.items()}
    lines = ["usage: segany predict model=sam_b.pt source=img.jpg [bboxes=...] [points=... labels=...] [key=value ...]",
             "", "Prompted segmentation, or segment-everything when no prompt is given. Saves the annotated",
             "image and a JSON of the masks (COCO RLE) per image to runs/segment/predict, predict2, ...", "",
             "options (default):"]
    order = ["model", "source", *PROMPT_DEFAULTS, *(k for k in defaults if k not in PROMPT_DEFAULTS)]
    for key in dict.fromkeys(order):
        if key not in skip:
            lines.append(f"  {key:<18} {PREDICT_NOTES.get(key, '')} ({_show(defaults[key])})")
    lines += ["", "segment-everything (Meta's name in brackets; * the model's own default, shown: SAM's):"]
    for key, value in EVERYTHING_DEFAULTS.items():
        alias = f" [{alias_of[key]}]" if key in alias_of else ""
        star = "*" if key in tuned else ""
        lines.append(f"  {key + alias + star:<44} ({_show(value)})")
    lines += [f"  * {DEFAULT_MODEL}, the default model, uses " + " and ".join(f"{k}={v}" for k, v in tuned.items())]
    lines += ["", "examples:", "  segany predict model=sam_b.pt source=img.jpg bboxes=[439,437,524,709]",
              "  segany predict --model mobile_sam.pt --source images/ --points [[400,370],[900,370]] --labels [1,1]",
              "  segany predict model=sam_b.pt source=img.jpg points_stride=16 crop_n_layers=1 save_txt=True"]
    return "\n".join(lines)


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def _str_or_none(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, list)) else str(value)


def load_mask_prompt(value: Any) -> Any:
    """``masks=`` as given on the command line: a path to a ``.npy`` file or a mask image → array."""
    if not isinstance(value, str):
        return value
    import numpy as np

    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"masks={value}: file not found (give a .npy file or a mask image)")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UsageError(f"masks={value}: not a readable .npy array ({e})") from None
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise UsageError(f"masks={value}: not a readable image or .npy file")
    return img > 127


def run_predict(tokens: list[str]) -> int:
    from .config import META_ALIASES, OPTION_TYPES, check_options
    from .engine.sources import count_sources, expand_once

    defaults = predict_defaults()
    given = parse_options(tokens, defaults, META_ALIASES, OPTION_TYPES, "predict")
    check_options({k: v for k, v in given.items() if k not in PROMPT_DEFAULTS})  # ranges, before the model loads
    opts = {**defaults, **given}
    for key in ("model", "source", "project", "name"):
        opts[key] = _str_or_none(opts[key])
    if opts["labels"] is not None and opts["points"] is None:
        raise UsageError("labels were given without points: pass points=[x,y] (or [[x,y],...]) with labels")
    source = opts["source"]
    if source is None:
        from .benchmark import default_image

        source = str(default_image())
        print(f"source not given: using the example image {source}", file=sys.stderr)
    # Everything that can be checked cheaply is checked before the model loads.
    source = expand_once(source)  # counted here, then iterated by the predictor: listed once
    total = count_sources(source, vid_stride=opts["vid_stride"])
    masks = load_mask_prompt(opts["masks"])
    writer = RunWriter.from_options(opts)  # its folder is made when the first result is written
    if opts["show"]:
        print("show=True is ignored by the command line (results are saved instead)", file=sys.stderr)

    from .model import SAM

    model = SAM(opts["model"] or DEFAULT_MODEL, device=opts["device"])
    kwargs = {k: v for k, v in given.items() if k not in CLI_HANDLED}
    results = model.predict(source, stream=True, bboxes=opts["bboxes"], points=opts["points"],
                            labels=opts["labels"], masks=masks, **kwargs)
    with _counting(SkippedImageWarning) as skipped:
        _consume(results, model, total, writer, bool(opts["verbose"]), skipped)
    if skipped:  # the run went on past them, but a script must know
        print(f"segany: error: {len(skipped)} file(s) could not be read and were skipped, listed above",
              file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _counting(category: type[Warning]) -> Iterator[list[str]]:
    """Collect the texts of the warnings of ``category`` shown inside the block (still shown)."""
    seen: list[str] = []
    with warnings.catch_warnings():
        show = warnings.showwarning

        def count(message, cat, *args, **kwargs):
            if issubclass(cat, category):
                seen.append(str(message))
            show(message, cat, *args, **kwargs)

        warnings.showwarning = count
        yield seen


def _consume(results, model, total: int | None, writer: RunWriter | None, verbose: bool,
             skipped: list[str]) -> None:
    """Write each result as it arrives, with a progress bar for several images and a line per
    image; files ``skipped`` so far (unreadable) are taken off the count."""
    from tqdm import tqdm

    from .engine.report import RunReport

    report = RunReport(total, model.model)
    bar = tqdm(total=total, unit="image", file=sys.stderr, disable=total == 1, leave=False)
    try:
        for r in results:
            if total is not None and skipped:
                report.total = bar.total = total - len(skipped)
            ms = report.add(r)
            if writer is not None:
                writer.write(r, ms)
            if verbose:
                tqdm.write(report.image_line(r, ms), file=sys.stdout)
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    print(report.speed_line())
    print("Done (save=False: nothing written)" if writer is None else writer.summary())
