"""Segment-everything speed and memory: segany vs Meta's ``SamAutomaticMaskGenerator``.

Not a test. Both sides get the same random weights (saved once to a temporary file), the same
image and the same parameters. Each side runs in its own child process, so its peak RSS
(``ru_maxrss``) is its own; the parent alternates the two children run by run after one
warm-up run each, and reports medians of:

- ``total``: the whole generate, encoder included (segany: ``predictor(source=img, ...)``;
  Meta: ``generator.generate(img)``);
- ``post``: decode and post-processing only (total minus the time inside the image encoder
  calls: segany's ``Predictor.encode``, Meta's ``SamPredictor.set_image``, crops included).

    python benchmarks/bench_everything.py --quick        # small model, a few seconds a run
    python benchmarks/bench_everything.py --points-per-side 16 --repeats 3   # ViT-B, 1024 px

``--smooth`` perturbs the random weights so that masks are smooth blobs like a trained model's
(random weights otherwise give salt-and-pepper masks with very long run-length codes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _setup_paths() -> None:
    sys.path.insert(0, str(ROOT / "tests"))  # conftest: random_sam, meta_sam, test_image
    sys.path.insert(0, str(ROOT / "src"))


def _config(args):
    from conftest import SMALL_VIT

    from segany.models import MODELS

    return SMALL_VIT if args.quick else MODELS[args.model]


def _meta_params(args) -> dict:
    return dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
                box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers,
                min_mask_region_area=args.min_mask_region_area)


# ----------------------------------------------------------------------------- child side
def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    img_bgr = np.load(args.image)
    params = _meta_params(args)
    enc = {"t": 0.0}

    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                enc["t"] += time.perf_counter() - t0
        return wrapper

    if args.child == "ours":
        from segany.engine.predictor import Predictor
        from segany.models import build_model

        model = build_model(_config(args))
        model.load_state_dict(state)
        del state
        pred = Predictor(overrides=dict(device=args.device), model=model)
        pred.encode = timed(pred.encode)

        def generate() -> int:
            return len(pred(source=img_bgr, **params)[0])
    else:
        from conftest import meta_sam
        from segment_anything import SamAutomaticMaskGenerator

        model = meta_sam(_config(args))
        model.load_state_dict(state)
        model.to(args.device)
        del state
        gen = SamAutomaticMaskGenerator(model, **params)
        gen.predictor.set_image = timed(gen.predictor.set_image)
        img_rgb = np.ascontiguousarray(img_bgr[..., ::-1])

        def generate() -> int:
            return len(gen.generate(img_rgb))

    print(json.dumps({"ready": True, "rss_mb": _maxrss_mb()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        enc["t"] = 0.0
        t0 = time.perf_counter()
        n = generate()
        sync()
        total = time.perf_counter() - t0
        print(json.dumps({"total": total, "post": total - enc["t"], "n": n}), flush=True)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(json.dumps({"maxrss_mb": _maxrss_mb(), "gpu_mb": gpu_mb}), flush=True)


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024


# ----------------------------------------------------------------------------- parent side
def _spawn(side: str, argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", side, *argv]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"child {proc.args[3]} died (exit code {proc.wait()})")
    return json.loads(line)


def parent(args, passthrough: list[str]) -> None:
    import torch
    from conftest import random_sam, smooth_weights, test_image

    cfg = _config(args)
    model = random_sam(cfg, seed=args.seed)
    if args.smooth:
        smooth_weights(model)  # conftest
    h, w = args.size
    img = test_image(h, w, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        wpath, ipath = os.path.join(tmp, "w.pt"), os.path.join(tmp, "img.npy")
        torch.save(model.state_dict(), wpath)
        np.save(ipath, img)
        del model
        argv = [*passthrough, "--weights", wpath, "--image", ipath]
        procs = {side: _spawn(side, argv) for side in ("ours", "meta")}
        try:
            base = {side: _read(p)["rss_mb"] for side, p in procs.items()}
            runs: dict[str, list[dict]] = {"ours": [], "meta": []}
            for i in range(args.warmup + args.repeats):
                for side in (("ours", "meta") if i % 2 == 0 else ("meta", "ours")):
                    procs[side].stdin.write("run\n")
                    procs[side].stdin.flush()
                    r = _read(procs[side])
                    print(f"  run {i} {side:4s} total {r['total']:8.2f} s  post {r['post']:8.2f} s  masks {r['n']}",
                          file=sys.stderr, flush=True)
                    if i >= args.warmup:
                        runs[side].append(r)
            peak, gpu = {}, {}
            for side, p in procs.items():
                p.stdin.write("quit\n")
                p.stdin.flush()
                last = _read(p)
                peak[side], gpu[side] = last["maxrss_mb"], last["gpu_mb"]
                p.wait()
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
    _report(args, cfg, runs, base, peak, gpu)


def _report(args, cfg, runs, base, peak, gpu) -> None:
    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("total", "post")} for s in runs}
    n = {s: sorted({r["n"] for r in runs[s]}) for s in runs}
    print(f"\nsegment everything: {cfg.name}, image {args.size[0]}x{args.size[1]}, "
          f"{json.dumps(_meta_params(args))}, weights {'smooth' if args.smooth else 'random'}, "
          f"median of {args.repeats} interleaved runs after {args.warmup} warm-up, torch threads "
          f"{args.threads or 'default'}, device {_device_name(args.device)}")
    print(f"{'':8s} {'total s':>10s} {'post s':>10s} {'peak RSS MiB':>13s} {'RSS after load':>15s} {'masks':>8s}")
    for s in ("ours", "meta"):
        print(f"{s:8s} {med[s]['total']:10.2f} {med[s]['post']:10.2f} {peak[s]:13.0f} {base[s]:15.0f} "
              f"{','.join(map(str, n[s])):>8s}")
    print(f"{'ratio':8s} {med['ours']['total'] / med['meta']['total']:10.2f} "
          f"{med['ours']['post'] / med['meta']['post']:10.2f} {peak['ours'] / peak['meta']:13.2f}")
    if args.device == "cuda":
        print(f"peak GPU memory MiB: ours {gpu['ours']:.0f}, meta {gpu['meta']:.0f}, "
              f"ratio {gpu['ours'] / gpu['meta']:.2f}")
    print("targets: total <= 0.6, post <= 0.3, peak RSS <= 1.0")
    print("reproduce: python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small ViT (256 px input), 8 points a side, 360x480 image")
    ap.add_argument("--model", default="sam_b", help="architecture from segany.models.MODELS (random weights)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default 768 1024)")
    ap.add_argument("--points-per-side", type=int)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.0, help="default 0: off (random weights)")
    ap.add_argument("--stability-score-thresh", type=float, default=0.0, help="default 0: off")
    ap.add_argument("--box-nms-thresh", type=float, default=0.7)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--min-mask-region-area", type=float, default=0)
    ap.add_argument("--smooth", action="store_true", help="smooth, local masks instead of salt-and-pepper ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="both sides run here")
    ap.add_argument("--child", choices=("ours", "meta"), help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size is None:
        args.size = [360, 480] if args.quick else [768, 1024]
    if args.points_per_side is None:
        args.points_per_side = 8 if args.quick else 32
    _setup_paths()
    if args.child:
        child(args)
        return
    passthrough = [a for a in sys.argv[1:]]
    if "--size" not in passthrough:
        passthrough += ["--size", *map(str, args.size)]
    parent(args, passthrough)


if __name__ == "__main__":
    main()
