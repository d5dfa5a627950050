"""Size, parameters and speed of the models available locally: the seed's SAM-vs-YOLO table.

>>> from segany.benchmark import benchmark, format_rows
>>> rows = benchmark(["sam_b.pt", "mobile_sam.pt"], device="cpu")
>>> print(format_rows(rows, "table"))

Nothing is downloaded: a model whose checkpoint is not on disk (a path, or the weights cache) is
a row with ``status="skipped"`` and the reason, as is one that fails to load. Speeds are ms per
image on the chosen device, the mean of ``runs`` timed runs after ``warmup`` untimed ones:

- ``encoder_ms``: the image encoder (preprocessing included);
- ``prompt_ms``: one box prompt on the cached embedding (decode plus masks at the original size);
- ``everything_ms``: segment-everything from the image (encoding included), timed once, and only
  when segment-everything is available in this version. For FastSAM / YOLO-seg rows (through the
  optional ``ultralytics`` package) it is their whole-image inference time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFoundError, NotAvailableError, SegAnyError

ULTRALYTICS_MODELS = ("FastSAM-s.pt", "yolo11n-seg.pt", "yolov8n-seg.pt")
COLUMNS = ("model", "status", "size_mb", "params_m", "encoder_ms", "prompt_ms", "everything_ms", "device", "reason")
HEADERS = ("model", "size (MB)", "params (M)", "encoder (ms/im)", "box prompt (ms)", "everything (ms/im)")


def default_image() -> Path:
    """The bundled example image the speeds are measured on when no ``source`` is given."""
    return Path(__file__).parent / "assets" / "astronaut.jpg"


def default_models() -> list[str]:
    """Every registry model (a row each: timed if its checkpoint is cached, else skipped) and,
    when ``ultralytics`` is installed, its FastSAM / YOLO-seg models."""
    from .models.registry import MODELS

    names = list(MODELS)
    return names + list(ULTRALYTICS_MODELS) if _has_ultralytics() else names + ["FastSAM / YOLO-seg"]


def _has_ultralytics() -> bool:
    import importlib.util

    return importlib.util.find_spec("ultralytics") is not None


def _is_ultralytics(name: str) -> bool:
    low = name.strip().lower()
    return low == "fastsam / yolo-seg" or Path(low).name.startswith(("fastsam", "yolo"))


def _row(model: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update({"model": model, "status": "ok", **fields})
    return row


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _timed(fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1000 / max(runs, 1)


def local_checkpoint(name: str) -> Path | None:
    """The checkpoint file for ``name`` already on disk (a path, or the weights cache under its
    official file name or any alias, e.g. ``sam_b.pt``), or None. Never downloads."""
    from .hub import resolve_weights, weights_dir
    from .models.registry import find_config

    try:
        return resolve_weights(name, download=False, progress=False)
    except CheckpointNotFoundError:
        pass
    cfg = find_config(Path(name).name)
    if cfg is None:
        return None
    for file in (cfg.name, *cfg.aliases):
        if (weights_dir() / file).is_file():
            return weights_dir() / file
    return None


def bench_sam(name: str, image, device: str = "", everything: bool = True, runs: int = 3, warmup: int = 1,
              half: bool = False) -> dict[str, Any]:
    """One row for a segany checkpoint (name or path); ``image`` is a BGR array."""
    import torch

    from .hub import weights_dir
    from .model import SAM

    path = local_checkpoint(name)
    if path is None:
        return _row(name, status="skipped", reason=f"not found locally (not a file, not in the weights cache "
                    f"{weights_dir()}); benchmark downloads nothing")
    try:
        model = SAM(str(path), device=device)
    except SegAnyError as e:
        return _row(name, status="skipped", reason=f"cannot load {path}: {_one_line(e)}")
    pred = model.predictor
    dev = model.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    h, w = image.shape[:2]
    box = [w // 4, h // 4, 3 * w // 4, 3 * h // 4]
    opts = dict(half=half)

    encoder_ms = _timed(lambda: pred.encode([image], half=half), runs, warmup, sync)
    pred.set_image(image)
    prompt_ms = _timed(lambda: pred(bboxes=box, **opts), runs, warmup, sync)
    params = sum(p.numel() for p in model.model.parameters())
    row = _row(name, size_mb=os.path.getsize(path) / 1e6, params_m=params / 1e6, encoder_ms=encoder_ms,
               prompt_ms=prompt_ms, device=str(dev))
    if everything:
        try:
            row["everything_ms"] = _timed(lambda: pred(source=image, **opts), 1, 0, sync)
        except NotAvailableError:
            row["reason"] = "segment-everything is not available in this version"
    return row


def bench_ultralytics(name: str, image, device: str = "", runs: int = 3, warmup: int = 1) -> dict[str, Any]:
    """One row for a FastSAM / YOLO-seg model through the optional ``ultralytics`` package."""
    if not _has_ultralytics():
        return _row(name, status="skipped", reason="the ultralytics package is not installed (pip install ultralytics)")
    from .hub import weights_dir

    path = next((p for p in (Path(name), weights_dir() / Path(name).name) if p.is_file()), None)
    if path is None:
        return _row(name, status="skipped", reason=f"{Path(name).name} not found locally (here or in {weights_dir()})")
    try:
        from ultralytics import YOLO, FastSAM

        model = (FastSAM if "fastsam" in path.name.lower() else YOLO)(str(path))
        params = sum(p.numel() for p in model.model.parameters()) / 1e6

        def run() -> None:
            model(image, device=device or None, verbose=False)

        ms = _timed(run, runs, warmup, lambda: None)
    except Exception as e:  # a third-party failure becomes a skipped row, not a crash of the table
        return _row(name, status="skipped", reason=f"ultralytics failed: {_one_line(e)}")
    return _row(name, size_mb=os.path.getsize(path) / 1e6, params_m=params, everything_ms=ms,
                device=device or "auto")


def benchmark(models: Iterable[str] | None = None, device: str = "", everything: bool = True, runs: int = 3,
              warmup: int = 1, source: Any = None, half: bool = False,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per model (see the module docstring); ``models`` defaults to :func:`default_models`."""
    from .engine.sources import load_image

    image = load_image(source if source is not None else default_image())
    rows = []
    for name in (list(models) if models is not None else default_models()):
        if progress:
            progress(name)
        if _is_ultralytics(name):
            rows.append(bench_ultralytics(name, image, device, runs, warmup))
        else:
            rows.append(bench_sam(name, image, device, everything, runs, warmup, half))
    return rows


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    """The rows as an aligned ``table`` (skipped models listed below it), ``json`` or ``csv``."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"format must be table, json or csv, not {fmt!r}")
    ok = [r for r in rows if r["status"] == "ok"]
    body = [[str(r["model"]), _fmt(r["size_mb"]), _fmt(r["params_m"], 2), _fmt(r["encoder_ms"]),
             _fmt(r["prompt_ms"]), _fmt(r["everything_ms"])] for r in ok]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(HEADERS)]
    line = lambda cells: " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(HEADERS), "-|-".join("-" * w for w in widths), *(line(b) for b in body)]
    if not ok:
        out.append("(no model could be timed)")
    notes = [f"{r['model']}: {r['reason']}" for r in ok if r["reason"]]
    skipped = [f"  {r['model']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    if notes:
        out += ["notes:", *(f"  {n}" for n in notes)]
    if skipped:
        out += ["skipped:", *skipped]
    return "\n".join(out)


# ------------------------------------------------------------------------------ command line

BENCHMARK_DEFAULTS: dict[str, Any] = dict(model=None, device="", everything=True, format="table", runs=3,
                                          warmup=1, source=None, half=False)
BENCHMARK_HELP = """\
usage: segany benchmark [model=a.pt,b.pt] [format=table|json|csv] [everything=True] [device='']

Size (MB), parameters (M) and speed (ms per image) of the checkpoints available locally, as in
the seed's SAM-vs-YOLO table. Nothing is downloaded: missing checkpoints are listed as skipped
(exit status 1 when none of the models named with model= could be timed).
  model       comma-separated names/paths or a list (default: every registry model, timed when
              its checkpoint is in the weights cache; FastSAM/YOLO-seg rows when the
              ultralytics package is installed)
  format      table (default), json or csv
  everything  also time segment-everything (default True; only when available)
  device      '', 'cpu', 'cuda:0', ...       half   bf16/fp16 autocast
  runs        timed runs per measure (3)      warmup untimed runs first (1)
  source      image to time on (default: the bundled example image)
columns: encoder = image encoding; box prompt = one box on the cached embedding;
everything = segment-everything from the image, encoding included"""


def run_cli(tokens: list[str]) -> int:
    """``segany benchmark key=value ...`` (see :data:`BENCHMARK_HELP`); returns the exit status."""
    from .cli import UsageError, parse_options
    from .config import suggest

    opts = {**BENCHMARK_DEFAULTS, **parse_options(tokens, BENCHMARK_DEFAULTS, command="benchmark")}
    fmt = str(opts["format"]).lower()
    if fmt not in ("table", "json", "csv"):
        raise UsageError(f"format={opts['format']}: use table, json or csv.{suggest(fmt, ['table', 'json', 'csv'])}")
    if opts["runs"] < 1 or opts["warmup"] < 0:
        raise UsageError("runs must be >= 1 and warmup >= 0")
    models = opts["model"]
    if isinstance(models, str):
        if models.startswith("[") and models.endswith("]"):  # [a.pt,b.pt]: a list of unquoted names, as JSON is not
            models = models[1:-1]
        models = [m.strip().strip("'\"") for m in models.split(",") if m.strip()]
    elif models is not None:
        models = [str(m) for m in (models if isinstance(models, list) else [models])]
    if opts["source"] is not None:
        from .engine.sources import count_sources

        # A missing image, or something other than one image, is bad usage, found before any model loads.
        if count_sources(str(opts["source"])) != 1 or os.path.isdir(str(opts["source"])):
            raise UsageError(f"source={opts['source']}: benchmark times one image; give an image file or URL")
    from .engine.device import select_device

    select_device(str(opts["device"]))  # a bad device is bad usage, not a column of skipped rows

    rows = benchmark(models, device=str(opts["device"]), everything=bool(opts["everything"]), runs=opts["runs"],
                     warmup=opts["warmup"], source=opts["source"], half=bool(opts["half"]),
                     progress=lambda name: print(f"benchmarking {name} ...", file=sys.stderr, flush=True))
    if fmt == "table":
        import torch

        print(f"segany benchmark on {select_device(str(opts['device']))} (torch {torch.__version__}), "
              f"ms per image, mean of {opts['runs']} run(s)")
    print(format_rows(rows, fmt))
    if models is not None and not any(r["status"] == "ok" for r in rows):
        # The models asked for were all skipped: nothing was measured, which a script must see.
        print("segany: error: none of the models given could be timed (see the reasons above)", file=sys.stderr)
        return 1
    return 0
