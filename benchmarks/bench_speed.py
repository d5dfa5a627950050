"""segany vs the reference implementations (and Ultralytics' SAM when the ``ultralytics`` package is
installed), same weights, same image, same process, interleaved.

Measures (median of --repeat runs after a warm-up):
  encoder      set_image on a 1024-long image: ViT-B (Meta segment-anything), MobileSAM (its own code),
               SAM 2.1 Hiera-T (Meta sam2), the embedded default model segany_tiny (Meta's classes
               with its weights)
  1 box        one box prompt → mask at the original size (Meta SamPredictor.predict)
  64 boxes     64 box prompts in one batch (Meta SamPredictor.predict_torch)
  everything   segment everything on a --everything-grid × --everything-grid point grid, encoding
               included (Meta SamAutomaticMaskGenerator.generate; one timing a side and round, no
               warm-up: the rows before have warmed every part up; random weights keep few masks,
               see bench_everything.py --smooth for trained-like ones)
  peak RSS     of a ViT-B set_image + 1 box, of 64 boxes on a set image, and (full size) of a
               MobileSAM and a Hiera-T set_image, each side in its own fresh process

Ultralytics (ViT-B rows and the MobileSAM encoder) runs its own SAM Predictor on the same weights, at
the same thread count as the others (it would drop to ``os.cpu_count() - 1`` threads: 1 on 2 cores).

Usage:
  python benchmarks/bench_speed.py                 # full size (ViT-B, MobileSAM, Hiera-T), minutes on 2 CPU cores
  python benchmarks/bench_speed.py --quick         # small random config, seconds (run by the tests)
  python benchmarks/bench_speed.py --half          # segany with half=True (bf16) against Meta fp32
  python benchmarks/bench_speed.py --everything-grid 0   # without the segment-everything row
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _models(quick: bool):
    from conftest import SMALL_VIT, meta_twin, random_sam

    from segany.models import MODELS

    cfg = SMALL_VIT if quick else MODELS["sam_b"]
    ours = random_sam(cfg, seed=0)
    return cfg, ours, meta_twin(ours, cfg)


def _ultralytics_predictor(model: torch.nn.Module, cfg, img_size: int):
    """Ultralytics' SAM Predictor over a copy of ``model``'s weights (a ViT SAM of config ``cfg``, or
    MobileSAM for ``cfg=None``), or None without the package. It runs at the process's thread
    count: its device selection would lower it."""
    if not _has_module("ultralytics"):
        return None
    import warnings

    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ultralytics.models.sam import Predictor as UltralyticsPredictor
        from ultralytics.models.sam.build import build_mobile_sam
    from conftest import meta_twin

    if cfg is None:
        twin = build_mobile_sam()
        twin.load_state_dict(model.state_dict())
    else:
        twin = meta_twin(model, cfg, "ultralytics")
    predictor = UltralyticsPredictor(overrides=dict(imgsz=img_size, save=False, verbose=False, device="cpu"))
    predictor.setup_model(model=twin.eval(), verbose=False)
    torch.set_num_threads(threads)
    return predictor


def _median_ms(fn, repeat: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _pair(name, ours_fn, ref_fn, repeat, rows, ultralytics_fn=None, warmup=True):
    """Times segany against the reference (and Ultralytics), in two interleaved rounds so that
    machine noise hits every side alike; each side's better round counts."""
    sides = {"reference": ref_fn, "segany": ours_fn}
    if ultralytics_fn is not None:
        sides["ultralytics"] = ultralytics_fn
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(2):
        for side, fn in sides.items():
            times[side].append(_median_ms(fn, max(1, repeat // 2), warmup))
    assert torch.get_num_threads() == threads, "a side changed the thread count"
    ms = {side: min(t) for side, t in times.items()}
    row = dict(job=name, segany_ms=round(ms["segany"], 1), reference_ms=round(ms["reference"], 1),
               ratio=round(ms["segany"] / ms["reference"], 3))
    line = (f"{name:<34} segany {ms['segany']:10.1f} ms   reference {ms['reference']:10.1f} ms"
            f"   ratio {ms['segany'] / ms['reference']:.2f}")
    if "ultralytics" in ms:
        row.update(ultralytics_ms=round(ms["ultralytics"], 1), ratio_ultralytics=round(ms["segany"] / ms["ultralytics"], 3))
        line += f"   ultralytics {ms['ultralytics']:10.1f} ms   ratio {ms['segany'] / ms['ultralytics']:.2f}"
    rows.append(row)
    print(line, flush=True)


def _one_box(h: int, w: int) -> np.ndarray:
    return np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.8 * h])


def _boxes_64(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 0.7, (64, 2)) * [w, h]
    return np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (64, 2)) * [w, h]], 1)


def _meta_boxes(mp, boxes: np.ndarray, h: int, w: int) -> None:
    """Meta's batched prompt path (``predict`` takes one box)."""
    tb = mp.transform.apply_boxes_torch(torch.as_tensor(boxes), (h, w)).float()
    mp.predict_torch(None, None, boxes=tb, multimask_output=False)


def run_speed(quick: bool, repeat: int, half: bool, everything_grid: int) -> list[dict]:
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    from segany import Predictor

    rows: list[dict] = []
    cfg, ours, ref = _models(quick)
    h, w = (180, 240) if quick else (768, 1024)
    img = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    rgb = img[..., ::-1].copy()  # Meta's predictors take RGB
    op = Predictor(overrides=dict(half=half), model=ours, config=cfg)
    mp = SamPredictor(ref)
    up = _ultralytics_predictor(ours, cfg, cfg.params["encoder"]["img_size"])
    if up is None:
        print("ultralytics: not installed, its columns are left out")
    ultralytics = (lambda fn: fn) if up is not None else (lambda fn: None)
    with torch.inference_mode():
        _pair(f"encoder {cfg.name}", lambda: op.set_image(img), lambda: mp.set_image(rgb), repeat, rows,
              ultralytics(lambda: up.set_image(img)))
        box = _one_box(h, w)
        # A prompt takes tens of milliseconds: many timings, or one busy moment decides the median.
        _pair("1 box -> original-size mask", lambda: op(bboxes=box),
              lambda: mp.predict(box=box, multimask_output=False), max(repeat, 30), rows,
              ultralytics(lambda: up(bboxes=box)))
        boxes = _boxes_64(h, w)
        _pair("64 boxes -> masks", lambda: op(bboxes=boxes), lambda: _meta_boxes(mp, boxes, h, w),
              max(1, repeat // 2), rows, ultralytics(lambda: up(bboxes=boxes)))
        if everything_grid:
            # Meta's defaults on all sides (Ultralytics' stability offset would be 0.95).
            amg = SamAutomaticMaskGenerator(ref, points_per_side=everything_grid)

            def ultralytics_everything():
                up.reset_image()
                up(source=img, points_stride=everything_grid, stability_score_offset=1.0)

            _pair(f"everything, {everything_grid}x{everything_grid} points", lambda: op(img, points_stride=everything_grid),
                  lambda: amg.generate(rgb), 2, rows, ultralytics(ultralytics_everything), warmup=False)
        if not quick:
            rows += run_mobile_sam(repeat, half, img)
            rows += run_sam2(repeat, half, img)
            rows += run_default_model(repeat, half, img)
    return rows


def run_default_model(repeat: int, half: bool, img: np.ndarray) -> list[dict]:
    """The embedded default model's encoder against Meta's classes holding the same weights."""
    from conftest import meta_sam
    from segment_anything import SamPredictor

    from segany import SAM, Predictor
    from segany.models import MODELS

    ours = SAM()
    ref = meta_sam(MODELS["segany_tiny"]).eval()
    ref.load_state_dict(ours.model.state_dict())
    op = Predictor(overrides=dict(half=half), model=ours.model, config=ours.config)
    mp = SamPredictor(ref)
    rows: list[dict] = []
    with torch.inference_mode():
        _pair("encoder segany_tiny (default model)", lambda: op.set_image(img),
              lambda: mp.set_image(img[..., ::-1].copy()), max(repeat, 10), rows)
    return rows


def _mobile_sam_predictors(half: bool):
    """segany's and MobileSAM's own predictor over the same random MobileSAM weights, and
    Ultralytics' (None without the package)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import SamPredictor as MobilePredictor
        from mobile_sam import sam_model_registry
    from conftest import randomize

    from segany import Predictor
    from segany.models import MODELS, build_model

    ours = randomize(build_model("mobile_sam"), 0)
    ref = sam_model_registry["vit_t"]().eval()
    ref.load_state_dict(ours.state_dict())
    return (Predictor(overrides=dict(half=half), model=ours, config=MODELS["mobile_sam"]), MobilePredictor(ref),
            _ultralytics_predictor(ours, None, 1024))


def _sam2_predictors(half: bool):
    """segany's and Meta's sam2 image predictor over the same random SAM 2.1 Hiera-T weights, or
    None without the sam2 package."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sam2.build_sam import build_sam2
            from sam2.sam2_image_predictor import SAM2ImagePredictor
    except ImportError:
        return None
    from conftest import randomize

    from segany import Predictor
    from segany.models import MODELS, build_model

    ours = randomize(build_model("sam2.1_t"), 0, std=0.02)
    ref = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", mode="eval")
    ref.load_state_dict(ours.state_dict())
    return Predictor(overrides=dict(half=half), model=ours, config=MODELS["sam2.1_t"]), SAM2ImagePredictor(ref)


def run_mobile_sam(repeat: int, half: bool, img: np.ndarray) -> list[dict]:
    op, mp, up = _mobile_sam_predictors(half)
    rows: list[dict] = []
    with torch.inference_mode():
        _pair("encoder mobile_sam", lambda: op.set_image(img), lambda: mp.set_image(img[..., ::-1].copy()),
              repeat, rows, None if up is None else lambda: up.set_image(img))
    return rows


def run_sam2(repeat: int, half: bool, img: np.ndarray) -> list[dict]:
    """SAM 2.1 Hiera-T's encoder (set_image) against Meta's sam2 image predictor, same weights."""
    pair = _sam2_predictors(half)
    if pair is None:
        print("encoder sam2.1_t: skipped (Meta's sam2 package is not installed)")
        return []
    op, mp = pair
    rows: list[dict] = []
    with torch.inference_mode():
        _pair("encoder sam2.1_t", lambda: op.set_image(img), lambda: mp.set_image(img[..., ::-1].copy()),
              repeat, rows)
    return rows


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


PEAK_JOBS = ("set_image + 1 box", "64 boxes after set_image")
# Full size only: the other encoders' set_image against their own reference code.
ENCODER_PEAK_JOBS = {"MobileSAM set_image": _mobile_sam_predictors, "Hiera-T set_image": _sam2_predictors}


def _peak_child(side: str, quick: bool, job: str) -> None:
    """Runs in a fresh process: one job on one side, then prints the peak RSS (Linux)."""
    from segment_anything import SamPredictor

    from segany import Predictor

    h, w = (180, 240) if quick else (768, 1024)
    img = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    if job in ENCODER_PEAK_JOBS:
        pair = ENCODER_PEAK_JOBS[job](False)
        p = pair[0] if side == "segany" else pair[1]
        del pair
        Path("/proc/self/clear_refs").write_text("5")  # only the encode counts, not the set-up
        base = _vm_hwm_kb()
        with torch.inference_mode():
            p.set_image(img if side == "segany" else img[..., ::-1].copy())
        print(json.dumps(dict(peak_mb=_vm_hwm_kb() / 1024, before_mb=base / 1024)))
        return
    cfg, ours, ref = _models(quick)
    if side == "segany":
        p = Predictor(model=ours, config=cfg)
    elif side == "reference":
        p = SamPredictor(ref)
    else:
        p = _ultralytics_predictor(ours, cfg, cfg.params["encoder"]["img_size"])
    del ours, ref  # the side's predictor holds its model
    image = img[..., ::-1].copy() if side == "reference" else img  # Meta's predictor takes RGB
    with torch.inference_mode():
        if job == PEAK_JOBS[1]:
            p.set_image(image)
        # Reset the peak-RSS mark after the set-up (models built, image set for a prompt-only job),
        # so only the measured job counts (Linux).
        Path("/proc/self/clear_refs").write_text("5")
        base = _vm_hwm_kb()
        if job == PEAK_JOBS[0]:
            p.set_image(image)
            if side == "reference":
                p.predict(box=_one_box(h, w), multimask_output=False)
            else:
                p(bboxes=_one_box(h, w))
        elif side == "reference":
            _meta_boxes(p, _boxes_64(h, w), h, w)
        else:
            p(bboxes=_boxes_64(h, w))
    print(json.dumps(dict(peak_mb=_vm_hwm_kb() / 1024, before_mb=base / 1024)))


def run_peak(quick: bool) -> list[dict]:
    rows = []
    jobs = PEAK_JOBS if quick else PEAK_JOBS + tuple(ENCODER_PEAK_JOBS)
    for job in jobs:
        if job == "Hiera-T set_image" and not _has_module("sam2"):
            continue
        sides = ["reference", "segany"]
        if job in PEAK_JOBS and _has_module("ultralytics"):
            sides.append("ultralytics")
        out = {}
        for side in sides:
            args = [sys.executable, __file__, "--peak-child", side, "--peak-job", job] + (["--quick"] if quick else [])
            res = subprocess.run(args, capture_output=True, text=True, check=True)
            out[side] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
        ratio = out["segany"] / out["reference"]
        line = (f"{'peak RSS, ' + job:<34} segany {out['segany']:10.0f} MB   reference {out['reference']:10.0f} MB"
                f"   ratio {ratio:.2f}")
        row = dict(job=f"peak RSS MB, {job}", segany_ms=round(out["segany"]), reference_ms=round(out["reference"]),
                   ratio=round(ratio, 3))
        if "ultralytics" in out:
            line += f"   ultralytics {out['ultralytics']:10.0f} MB   ratio {out['segany'] / out['ultralytics']:.2f}"
            row.update(ultralytics_ms=round(out["ultralytics"]), ratio_ultralytics=round(out["segany"] / out["ultralytics"], 3))
        print(line)
        rows.append(row)
    return rows


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small random config (seconds)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--half", action="store_true", help="segany with half=True (bf16)")
    ap.add_argument("--everything-grid", type=int, default=None,
                    help="points per side of the segment-everything row (default 16, --quick 8; 0: no row)")
    ap.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    ap.add_argument("--peak-child", choices=["segany", "reference", "ultralytics"], help=argparse.SUPPRESS)
    ap.add_argument("--peak-job", choices=PEAK_JOBS + tuple(ENCODER_PEAK_JOBS), default=PEAK_JOBS[0],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        _peak_child(args.peak_child, args.quick, args.peak_job)
        return
    from segany.models.common import CPU_NATIVE_BF16

    units = "bf16 units" if CPU_NATIVE_BF16 else "no bf16 units: half=True runs fp32"
    print(f"# {time.strftime('%Y-%m-%d')} {_cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, {units}),"
          f" {torch.get_num_threads()} threads, torch {torch.__version__}, command: python {' '.join(sys.argv)}")
    grid = args.everything_grid if args.everything_grid is not None else 8 if args.quick else 16
    rows = run_speed(args.quick, args.repeat, args.half, grid) + run_peak(args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
