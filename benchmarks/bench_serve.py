"""Load benchmark of ``segany serve`` (not a test): prompt latency under concurrency.

Starts the server with uvicorn on 127.0.0.1 (an ephemeral port, in this process), uploads one
image (its embedding is cached), then sends ``--requests`` prompt requests (one random positive
point each, RLE answers) from ``--concurrency`` client threads, and reports p50/p90/p99/max
latency, throughput and the error count. ``--everything N`` also keeps N segment-everything
jobs going meanwhile, to show prompts are served first (see ``segany.serve.worker``).

    python benchmarks/bench_serve.py                           # small random SAM, 500 x 8
    python benchmarks/bench_serve.py --arch sam_b --size 1024x768  # ViT-B (random weights), 1024 px
    python benchmarks/bench_serve.py --model path/to/sam_b.pt --image bus.jpg
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest: random_sam, SMALL_VIT, test_image
sys.path.insert(0, str(ROOT / "src"))


def _checkpoint(args: argparse.Namespace, tmp: Path) -> str:
    if args.model:
        return args.model
    import torch
    from conftest import SMALL_VIT, random_sam

    from segany.models import MODELS

    config = SMALL_VIT if args.arch == "small" else MODELS[args.arch]
    path = tmp / f"random_{args.arch}.pth"
    torch.save(random_sam(config, seed=1).state_dict(), path)
    return str(path)


def _image_bytes(args: argparse.Namespace) -> bytes:
    if args.image:
        return Path(args.image).read_bytes()
    import cv2
    from conftest import test_image

    w, h = (int(v) for v in args.size.lower().split("x"))
    return cv2.imencode(".png", test_image(h, w))[1].tobytes()


def _start(app):
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(300):  # up to 30 s
        if srv.started:
            break
        time.sleep(0.1)
    if not srv.started:
        raise SystemExit("the server did not start")
    return srv, thread, f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint path (default: random weights of --arch)")
    ap.add_argument("--arch", default="small", help="small (256 px test model), sam_b, mobile_sam, ...")
    ap.add_argument("--image", help="image file (default: a synthetic image of --size)")
    ap.add_argument("--size", default="640x480", help="synthetic image WxH")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--everything", type=int, default=0, help="segment-everything jobs kept running meanwhile")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import httpx
    import numpy as np

    from segany import SAM
    from segany.serve import create_app

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(args, Path(tmp))
        srv, thread, url = _start(create_app(SAM(ckpt, device=args.device)))
    try:
        with httpx.Client(timeout=120) as c:
            t0 = time.perf_counter()
            info = c.post(url + "/api/images", content=_image_bytes(args)).json()
            encode_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        pts = [[float(rng.uniform(0, info["width"] - 1)), float(rng.uniform(0, info["height"] - 1))]
               for _ in range(args.requests)]
        local = threading.local()
        stop = threading.Event()

        def one(p):
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            t = time.perf_counter()
            try:
                r = local.client.post(f"{url}/api/images/{info['id']}/prompt", json={"points": [p], "labels": [1]})
                ok = r.status_code == 200 and len(r.json()["masks"]) == 1
            except httpx.HTTPError:
                ok = False
            return time.perf_counter() - t, ok

        def everything_loop():
            with httpx.Client(timeout=600) as c:
                while not stop.is_set():
                    c.post(f"{url}/api/images/{info['id']}/everything", json={"points_per_side": 16})

        bg = [threading.Thread(target=everything_loop, daemon=True) for _ in range(args.everything)]
        for b in bg:
            b.start()
        for p in pts[: 2 * args.concurrency]:  # warm-up (not counted)
            one(p)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            out = list(pool.map(one, pts))
        wall = time.perf_counter() - t0
        stop.set()
        for b in bg:
            b.join(600)
    finally:
        srv.should_exit = True
        thread.join(30)
    lat = sorted(1000 * t for t, _ in out)
    q = lambda f: lat[min(len(lat) - 1, int(round(f * (len(lat) - 1))))]  # noqa: E731
    report = dict(model=Path(ckpt).name if args.model else f"random {args.arch}",
                  image=f"{info['width']}x{info['height']}",
                  requests=len(out), concurrency=args.concurrency, everything_jobs=args.everything,
                  errors=sum(not ok for _, ok in out), upload_encode_ms=round(encode_s * 1000, 1),
                  p50_ms=round(q(0.5), 2), p90_ms=round(q(0.9), 2), p99_ms=round(q(0.99), 2),
                  max_ms=round(lat[-1], 2), mean_ms=round(statistics.fmean(lat), 2),
                  throughput_rps=round(len(out) / wall, 1))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
