"""Fine-tuning SAM on a segmentation dataset with simulated prompts (SAM paper, appendix A).

    from segany.train import train
    out = train("sam_b", data="data/coco.json", epochs=10, batch=2, lr=1e-4, trainable="decoder")

Each step encodes ``batch`` images, picks up to ``max_instances`` objects per image and prompts
each with a noisy box or a random inside point (3 candidate masks for a lone point, whose loss
uses the best one); ``click_rounds`` corrective clicks follow, sampled from the error region of
the previous prediction, whose low-res logits are fed back as the mask prompt.

Checkpoints in ``project/name`` (default ``runs/train/exp*``): ``last.pt`` and ``best.pt`` are
plain state dicts (keys as Meta's ``Sam``, so ``segany.SAM(path)`` and ``segment_anything`` load
them); ``last_state.pt`` holds the optimizer, scheduler and progress for ``resume``. Every
epoch draws its randomness from ``(seed, epoch)``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..checkpoints import read_state_dict
from ..data.datasets import load_dataset
from ..engine.device import select_device
from ..errors import ConfigError
from .common import atomic_save, next_run_dir, prepare, resolve_model
from .losses import sam_loss
from .prompts_sim import corrective_point, noisy_box, random_point

TRAINABLE = {"decoder": ("mask_decoder",), "prompt+decoder": ("prompt_encoder", "mask_decoder"),
             "all": ("image_encoder", "prompt_encoder", "mask_decoder")}


def set_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Freeze all but the parts named by ``trainable``; return the parameters that train."""
    if trainable not in TRAINABLE:
        raise ConfigError(f"trainable={trainable!r}; choose one of {', '.join(TRAINABLE)}")
    parts = TRAINABLE[trainable]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in parts)
        if p.requires_grad:
            params.append(p)
    return params


def lr_lambda(total: int, warmup: int, min_frac: float = 0.01) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_frac`` of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _decode_loss(model, emb, gt, boxes, points, labels, multimask, mask_in=None):
    pts = None if points is None else (points, labels)
    logits, iou = model.decode(emb, points=pts, boxes=boxes, mask_inputs=mask_in, multimask_output=multimask)
    up = nn.functional.interpolate(logits.float(), gt.shape[-2:], mode="bilinear", align_corners=False)
    loss, best, parts = sam_loss(up, iou, gt)
    rows = torch.arange(len(best), device=best.device)
    return loss, parts, logits[rows, best][:, None].detach().float(), up[rows, best].detach() > 0


def image_loss(model: nn.Module, emb: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator,
               max_instances: int, click_rounds: int, box_prob: float, loss_size: int
               ) -> tuple[torch.Tensor, dict[str, float]] | None:
    """Loss of one image's prompts: ``emb`` ``(1, C, h, w)``, ``masks`` ``(N, S, S)`` in the input frame."""
    keep = [i for i in range(len(masks)) if masks[i].any()]
    if not keep:
        return None
    idx = rng.permutation(keep)[:max_instances]
    gt_full = masks[torch.as_tensor(idx, device=masks.device)]
    gt_np = gt_full.cpu().numpy()
    # Loss at a bounded resolution: a 1024 model is judged on 256×256, like its low-res logits.
    gt = nn.functional.interpolate(gt_full[:, None].float(), (loss_size, loss_size), mode="area")[:, 0] > 0.5
    dev = emb.device
    use_box = rng.random() < box_prob
    boxes = points = labels = None
    if use_box:
        boxes = torch.as_tensor(np.stack([noisy_box(m, rng) for m in gt_np]), dtype=torch.float32, device=dev)
    else:
        points = torch.as_tensor(np.stack([random_point(m, rng) for m in gt_np])[:, None], dtype=torch.float32,
                                 device=dev)
        labels = torch.ones(points.shape[:2], dtype=torch.int64, device=dev)
    # A lone point is ambiguous: 3 candidates, the loss takes the best (SAM paper).
    loss, parts, prev_logits, prev_mask = _decode_loss(model, emb, gt, boxes, points, labels, multimask=not use_box)
    total, n = loss, 1
    scale = gt_np.shape[-1] / loss_size
    for _ in range(click_rounds):
        pred_np = prev_mask.cpu().numpy()
        gt_small = gt.cpu().numpy()
        new_pts, new_lab = [], []
        for k in range(len(idx)):
            c = corrective_point(pred_np[k], gt_small[k], rng)
            if c is None:  # already perfect: repeat a positive point (a no-op click)
                c = (random_point(gt_small[k], rng), 1)
            new_pts.append(c[0] * scale)
            new_lab.append(c[1])
        p = torch.as_tensor(np.stack(new_pts)[:, None], dtype=torch.float32, device=dev)
        lab = torch.as_tensor(new_lab, dtype=torch.int64, device=dev)[:, None]
        points = p if points is None else torch.cat([points, p], 1)
        labels = lab if labels is None else torch.cat([labels, lab], 1)
        loss, _, prev_logits, prev_mask = _decode_loss(model, emb, gt, boxes, points, labels, False,
                                                       mask_in=prev_logits)
        total, n = total + loss, n + 1
    return total / n, {k: float(v) for k, v in parts.items()}


def train(model: Any, data: Any, epochs: int = 10, batch: int = 2, lr: float = 1e-4, imgsz: int | None = None,
          trainable: str = "decoder", weight_decay: float = 0.01, warmup: float = 0.05, max_instances: int = 8,
          click_rounds: int = 1, box_prob: float = 0.5, grad_clip: float = 1.0, amp: bool = True,
          device: str = "", seed: int = 0, val_data: Any = None, val_max_images: int | None = 50,
          project: str = "runs/train", name: str = "exp", exist_ok: bool = False, resume: bool | str = False,
          verbose: bool = True, threads: int | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` (a registry architecture name for fresh weights, a checkpoint, a
    :class:`segany.SAM` or an ``nn.Module``) on ``data`` (see :func:`segany.data.load_dataset`).

    ``trainable``: ``"decoder"`` (mask decoder), ``"prompt+decoder"`` or ``"all"``. ``warmup`` is a
    fraction of all steps. ``resume=True`` continues ``project/name``; a path continues that run
    (its ``last.pt`` / folder). ``val_data`` picks ``best.pt`` by validation mIoU (mean of box and
    best-of-3 point), else by the lowest epoch training loss. ``on_epoch_end(epoch, record)`` is
    called after each epoch's checkpoints are written. Returns the run summary.
    """
    if trainable not in TRAINABLE:  # before anything is built or written
        raise ConfigError(f"trainable={trainable!r}; choose one of {', '.join(TRAINABLE)}")
    if threads:
        torch.set_num_threads(threads)
    dev = select_device(device)
    net, config = resolve_model(model, imgsz)
    ds = load_dataset(data)
    if len(ds) == 0:
        raise ValueError(f"the dataset {data!r} holds no annotated images")
    state = None
    if resume:
        run_dir = Path(project) / name if resume is True else Path(resume)
        run_dir = run_dir.parent if run_dir.suffix == ".pt" else run_dir
        state = torch.load(run_dir / "last_state.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(read_state_dict(run_dir / "last.pt"), strict=True)
    else:
        run_dir = next_run_dir(project, name, exist_ok)
    net.to(dev)
    params = set_trainable(net, trainable)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(ds) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, int(warmup * total))))
    start_epoch, step, best_fit, history = 0, 0, -math.inf, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step, best_fit = state["epoch"], state["step"], state["best_fitness"]
        history = list(state.get("history", []))
    use_amp = amp and dev.type == "cuda"
    loss_size = min(net.img_size, 256)
    train_encoder = trainable == "all"
    args = dict(epochs=epochs, batch=batch, lr=lr, imgsz=net.img_size, trainable=trainable, seed=seed,
                weight_decay=weight_decay, warmup=warmup, max_instances=max_instances, click_rounds=click_rounds,
                box_prob=box_prob, grad_clip=grad_clip, data=str(data), model=str(model) if isinstance(model, str)
                else config.name)
    for epoch in range(start_epoch, epochs):
        net.train()
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(ds))
        bar = _progress(range(steps_per_epoch), f"epoch {epoch + 1}/{epochs}", verbose)
        sums, count, t0 = {"loss": 0.0, "miou": 0.0}, 0, time.time()
        for b in bar:
            samples = [ds[int(i)] for i in order[b * batch : (b + 1) * batch]]
            prepared = [prepare(net, s, dev, flip=bool(rng.random() < 0.5)) for s in samples]
            x = torch.cat([p[0] for p in prepared])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                with torch.set_grad_enabled(train_encoder):
                    emb = net.encode_image(x)
                losses, parts = [], []
                for j, (_, masks, _) in enumerate(prepared):
                    out = image_loss(net, emb[j : j + 1], masks, rng, max_instances, click_rounds, box_prob,
                                     loss_size)
                    if out is not None:
                        losses.append(out[0])
                        parts.append(out[1])
            if not losses:
                sched.step()
                step += 1
                continue
            loss = torch.stack(losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            step += 1
            sums["loss"] += float(loss.detach())
            sums["miou"] += float(np.mean([p["miou"] for p in parts]))
            count += 1
            if verbose:
                bar.set_postfix(loss=f"{sums['loss'] / count:.4f}", miou=f"{sums['miou'] / count:.3f}",
                                lr=f"{sched.get_last_lr()[0]:.2e}")
        record: dict[str, Any] = dict(epoch=epoch + 1, step=step, time_s=round(time.time() - t0, 2),
                                      loss=sums["loss"] / max(count, 1), train_miou=sums["miou"] / max(count, 1))
        fitness = -record["loss"]
        if val_data is not None:
            from .validate import val

            v = val(net, val_data, max_images=val_max_images, kinds=("box", "point"), verbose=False, device=dev)
            record.update({f"val_{k}": v[k] for k in ("box", "point_best3")})
            fitness = (v["box"] + v["point_best3"]) / 2
        history.append(record)
        net.eval()
        sd = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        atomic_save(sd, run_dir / "last.pt")
        if fitness > best_fit:
            best_fit = fitness
            atomic_save(sd, run_dir / "best.pt")
        atomic_save(dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch + 1, step=step,
                         best_fitness=best_fit, history=history, args=args), run_dir / "last_state.pt")
        if verbose:
            print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    return dict(save_dir=str(run_dir), last=str(run_dir / "last.pt"), best=str(run_dir / "best.pt"),
                epochs=epochs, steps=step, best_fitness=best_fit, history=history, args=args, model=net)


def _progress(it, desc: str, verbose: bool):
    if not verbose:
        return _Quiet(it)
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=True, dynamic_ncols=True)


class _Quiet:
    def __init__(self, it) -> None:
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **_: Any) -> None:
        pass
