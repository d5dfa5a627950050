"""Train the small embedded default model on the synthetic generator (issue 8).

The shipped ``src/segany/assets/segany_tiny.pt`` was made by three runs of this script
(2026-11-26, torch 2.11, 14 data workers), each starting from the previous run's ``best.pt``:

    # 1. from scratch, one NVIDIA H200, ~50 s an epoch (best: epoch 7 of 8)
    python scripts/train_default_model.py --device cuda --steps 2400 --epochs 8 --batch 64 --lr 1e-3 \
        --seed 0 --workers 14 --out runs/default_model
    # 2. one NVIDIA H100, ~24 s an epoch (run as --minutes 6, which picked 321 steps)
    python scripts/train_default_model.py --device cuda --steps 321 --epochs 6 --batch 256 --lr 1e-3 \
        --seed 1 --init runs/default_model/best.pt --workers 14 --out runs/default_model_2
    # 3. one NVIDIA H100, ~65 s an epoch (best: epoch 5 of 5) -> the shipped file
    python scripts/train_default_model.py --device cuda --steps 880 --epochs 5 --batch 256 --lr 7e-4 \
        --seed 2 --init runs/default_model_2/best.pt --workers 14 --out runs/default_model_3

Held-out box mIoU after each: 0.864, 0.881, 0.902 (200 images of seed 1000). Run 1 was stopped
by the device's time limit during epoch 8 and finished with ``train(..., resume=True)``, which
continues exactly. The history and held-out figures are in ``src/segany/assets/segany_tiny.json``;
run 1's file is the one shipped before (``git log -- src/segany/assets/segany_tiny.pt``).
``--minutes M`` instead of ``--steps`` times a short run first and picks the number of steps that
fits in M minutes (printed and saved, so a run can be repeated with ``--steps``). ``--init`` starts
from a checkpoint; give a new ``--seed`` so that it sees new images (a fresh warm-up and cosine
schedule).

A training step is bound by dispatch, not arithmetic: ~29k PyTorch ops per step whatever the
batch (an H100 probe: 305 ms a step of 64 images with the data ready). A larger ``--batch``
therefore costs little more per step: runs 2 and 3 took 0.37–0.44 s a step of 256 images, data
workers' start-up and validation included (~600 images a second against run 1's ~400).

The architecture is SAM's (ViT image encoder, prompt encoder, two-way mask decoder) at a small
width and depth with a 256-pixel input, so Meta's ``segment_anything`` classes load the state
dict. Patches of 8 pixels (SAM: 16) give a 32×32 embedding and 128×128 low-res masks: 2 pixels a
logit at 256, where edges decide the IoU of small objects; the encoder still takes ~50 ms on 2
CPU cores. Training data: ``SyntheticDataset(n, seed)`` with ``n = steps × batch / epochs``, each
image seen once per epoch (flipped at random); validation: a held-out synthetic set made with a
different seed (``--val-seed``). The figures are written to ``<out>/val.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from segany.data import SyntheticDataset
from segany.models import MODELS, build_model
from segany.train import train, val

DEFAULT_CONFIG = MODELS["segany_tiny"]


def run(a: argparse.Namespace, steps: int, epochs: int, out: Path, on_epoch_end=None) -> dict:
    torch.manual_seed(a.seed)
    model = a.init if a.init else build_model(DEFAULT_CONFIG)  # a checkpoint path: train() loads it
    n = math.ceil(steps * a.batch / epochs)
    return train(model, SyntheticDataset(n, seed=a.seed, size=256), epochs=epochs, batch=a.batch, lr=a.lr,
                 trainable="all", seed=a.seed, click_rounds=1, max_instances=8, warmup=0.03, device=a.device,
                 workers=a.workers, val_data=SyntheticDataset(40, seed=a.val_seed + 1, size=256),
                 val_max_images=40, project=str(out.parent), name=out.name, exist_ok=True, verbose=a.verbose,
                 on_epoch_end=on_epoch_end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help="optimizer steps in all")
    ap.add_argument("--minutes", type=float, help="pick --steps to fit this long (timed on a short run)")
    ap.add_argument("--epochs", type=int, default=8, help="checkpoints and validation after each")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="start from this checkpoint (e.g. the shipped segany_tiny.pt) instead of "
                                   "random weights; use another --seed for fresh images")
    ap.add_argument("--val-seed", type=int, default=1000)
    ap.add_argument("--val-n", type=int, default=200)
    ap.add_argument("--device", default="")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default="runs/default_model")
    ap.add_argument("--copy-to", help="also copy best.pt and val.json here after each epoch")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    n_params = sum(p.numel() for p in build_model(DEFAULT_CONFIG).parameters())
    print(f"{DEFAULT_CONFIG.name}: {n_params / 1e6:.2f} M parameters, {n_params * 4 / 2**20:.1f} MiB fp32")
    steps = a.steps
    if steps is None:
        if a.minutes is None:
            ap.error("give --steps or --minutes")
        probe_steps = 60
        t0 = time.time()
        epoch_s = run(a, probe_steps, 1, out.with_name(out.name + "_probe"))["history"][0]["time_s"]
        # Per step from the epoch's time (its data workers' start-up included); the rest of the
        # probe (building, CUDA start, one validation) is paid once more by the real run.
        per_step, fixed_s = epoch_s / probe_steps, time.time() - t0 - epoch_s
        steps = max(a.epochs, int((a.minutes * 60 - fixed_s) / per_step * 0.9))
        print(f"probe: {per_step * 1000:.0f} ms per step, {fixed_s:.0f} s fixed -> --steps {steps}", flush=True)

    def copy(epoch: int, record: dict) -> None:
        print(json.dumps(record), flush=True)
        if a.copy_to:
            Path(a.copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "best.pt", Path(a.copy_to) / "best.pt")

    t0 = time.time()
    res = run(a, steps, a.epochs, out, on_epoch_end=copy)
    train_s = time.time() - t0
    figures = val(res["best"], SyntheticDataset(a.val_n, seed=a.val_seed, size=256), device=a.device,
                  verbose=True)
    figures.update(steps=steps, train_seconds=round(train_s), args=vars(a), params=n_params,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   torch=torch.__version__, history=res["history"])
    (out / "val.json").write_text(json.dumps(figures, indent=2))
    if a.copy_to:
        shutil.copy(out / "val.json", Path(a.copy_to) / "val.json")
    print(json.dumps({k: v for k, v in figures.items() if k != "history"}))


if __name__ == "__main__":
    main()
