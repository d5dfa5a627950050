"""Train the small embedded default model on the synthetic generator (issue 8).

Exact command (CPU, one thread, seed 0):

    python scripts/train_default_model.py --epochs 7 --n 1800 --batch 8 --lr 1e-3 --seed 0 \
        --out runs/default_model
    # then continued (resume keeps weights, optimizer and step; the cosine runs over 11 epochs):
    python scripts/train_default_model.py --epochs 11 --n 1800 --batch 8 --lr 1e-3 --seed 0 \
        --out runs/default_model --resume

First run (2026-11-26, 2 shared CPU cores, ~38 min): held-out box mIoU 0.628, point (best of 3)
0.592 after 7 epochs; resumed to 11 epochs (~18 min more): box 0.648, point best-of-3 0.616,
point auto 0.540, single 0.569, 3 points 0.541 (100 images, 346 instances, val seed 1000).
Below the 0.85 bar, so no model is shipped from it; the loss was still falling.

The architecture is SAM's (ViT image encoder, prompt encoder, two-way mask decoder) at a small
width and depth with a 256-pixel input, so Meta's ``segment_anything`` classes load the state
dict. Training data: ``SyntheticDataset(n, seed)``; validation: a held-out synthetic set made
with a different seed (``--val-seed``). The figures are written to ``<out>/val.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from segany.data import SyntheticDataset
from segany.models import ModelConfig, build_model
from segany.models.registry import SAM_DECODER
from segany.train import train, val

DEFAULT_CONFIG = ModelConfig(
    "segany_tiny", "sam_vit",
    dict(
        encoder=dict(img_size=256, patch_size=16, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                     window_size=8, global_attn_indexes=(2, 5)),
        **dict(SAM_DECODER, prompt_embed_dim=128, decoder_mlp_dim=512, iou_head_hidden_dim=128),
    ),
    description="segany tiny demo model (synthetic data)",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--n", type=int, default=2000, help="synthetic training images")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-seed", type=int, default=1000)
    ap.add_argument("--val-n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/default_model")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = build_model(DEFAULT_CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{DEFAULT_CONFIG.name}: {n_params / 1e6:.2f} M parameters, {n_params * 4 / 2**20:.1f} MiB fp32")
    out = Path(a.out)
    t0 = time.time()
    res = train(model, SyntheticDataset(a.n, seed=a.seed, size=256), epochs=a.epochs, batch=a.batch, lr=a.lr,
                trainable="all", seed=a.seed, click_rounds=1, max_instances=8, warmup=0.03,
                val_data=SyntheticDataset(20, seed=a.val_seed + 1, size=256), val_max_images=20,
                project=str(out.parent), name=out.name, exist_ok=True, resume=str(out) if a.resume else False)
    figures = val(res["best"], SyntheticDataset(a.val_n, seed=a.val_seed, size=256), verbose=True)
    figures.update(train_seconds=round(time.time() - t0), args=vars(a), history=res["history"])
    (out / "val.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
