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

import inspect
import math
import os
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data.datasets import load_dataset
from ..engine.device import select_device
from ..engine.export import atomic_torch_save
from ..errors import ConfigError, SkippedImageWarning, warn
from .common import next_run_dir, resolve_model
from .losses import sam_loss
from .batch import InputFrameSamples, batch_prompts, pad_mask
from .prompts_sim import corrective_points, noisy_boxes, random_points
from .resume import load_last, record_name, recorded_data, resumed_settings, saved_run, weights_sum

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


def batch_loss(model: nn.Module, emb: torch.Tensor, masks: torch.Tensor, image_index: torch.Tensor,
               generator: torch.Generator, click_rounds: int, box_prob: float, loss_size: int
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch's prompts: ``emb`` ``(B, C, h, w)``, ``masks`` ``(P, S, S)`` in the input
    frame, one per prompted instance, ``image_index`` ``(P,)`` the image of each.

    Each instance gets a noisy box (one output) or, with probability ``1 - box_prob``, a random
    inside point (3 outputs, the loss takes the best: a lone point is ambiguous), then
    ``click_rounds`` corrective clicks with the previous low-res logits as the mask prompt. All
    prompts of a kind go through the decoder together. Returns the mean loss over prompts and
    rounds and the first round's loss parts.
    """
    dev, n = masks.device, len(masks)
    # Loss at a bounded resolution: a 1024 model is judged on 256×256, like its low-res logits.
    gt = nn.functional.interpolate(masks[:, None].float(), (loss_size, loss_size), mode="area")[:, 0] > 0.5
    scale = masks.shape[-1] / loss_size
    use_box = torch.rand(n, generator=generator, device=dev) < box_prob
    total = torch.zeros((), device=dev)
    parts_sum: dict[str, torch.Tensor] = {}
    for box_group in (True, False):
        idx = torch.nonzero(use_box == box_group).flatten()
        if len(idx) == 0:
            continue
        m, target, e = masks[idx], gt[idx], emb[image_index[idx]]
        boxes = points = labels = None
        if box_group:
            boxes = noisy_boxes(m, generator)
        else:
            points = random_points(m, generator)[:, None]
            labels = torch.ones(points.shape[:2], dtype=torch.int64, device=dev)
        loss, parts, prev_logits, prev_mask = _decode_loss(model, e, target, boxes, points, labels,
                                                           multimask=not box_group)
        group_total = loss
        for _ in range(click_rounds):
            p, lab = corrective_points(prev_mask, target, generator)
            p, lab = (p * scale)[:, None], lab[:, None]
            points = p if points is None else torch.cat([points, p], 1)
            labels = lab if labels is None else torch.cat([labels, lab], 1)
            loss, _, prev_logits, prev_mask = _decode_loss(model, e, target, boxes, points, labels, False,
                                                           mask_in=prev_logits)
            group_total = group_total + loss
        weight = len(idx) / n
        total = total + weight * group_total / (1 + click_rounds)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0) + weight * v
    return total, parts_sum


def train(model: Any = None, data: Any = None, epochs: int = 10, batch: int = 2, lr: float = 1e-4,
          imgsz: int | None = None, trainable: str = "decoder", weight_decay: float = 0.01, warmup: float = 0.05,
          max_instances: int = 8, click_rounds: int = 1, box_prob: float = 0.5, grad_clip: float = 1.0, amp: bool = True,
          device: str = "", seed: int = 0, val_data: Any = None, val_max_images: int | None = 50,
          project: str = "runs/train", name: str = "exp", exist_ok: bool = False, resume: bool | str = False,
          verbose: bool = True, threads: int | None = None, workers: int | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` (a registry architecture name for fresh weights, a checkpoint, a
    :class:`segany.SAM` or an ``nn.Module``) on ``data`` (see :func:`segany.data.load_dataset`).

    ``trainable``: ``"decoder"`` (mask decoder), ``"prompt+decoder"`` or ``"all"``. ``warmup`` is a
    fraction of all steps. ``resume=True`` continues ``project/name``; a path continues that run
    (its ``last.pt`` / folder) with the run's own settings, model and data: ``model`` and ``data``
    may be left out (a model object given is loaded with the run's ``last.pt``; otherwise the model
    is rebuilt from it). ``val_data`` picks ``best.pt`` by validation mIoU (mean of box and
    best-of-3 point), else by the lowest epoch training loss. ``on_epoch_end(epoch, record)`` is
    called after each epoch's checkpoints are written. Returns the run summary.
    """
    if not resume:
        _require_model_and_data(model, data)
    if trainable not in TRAINABLE:  # before anything is built or written
        raise ConfigError(f"trainable={trainable!r}; choose one of {', '.join(TRAINABLE)}")
    for key, value in dict(epochs=epochs, batch=batch, max_instances=max_instances).items():
        _check(key, value, "a whole number >= 1", lambda v: float(v).is_integer() and v >= 1)
    _check("click_rounds", click_rounds, "a whole number >= 0", lambda v: float(v).is_integer() and v >= 0)
    _check("lr", lr, "a positive number", lambda v: v > 0)
    for key, value in dict(weight_decay=weight_decay, grad_clip=grad_clip).items():
        _check(key, value, "a number >= 0.0", lambda v: v >= 0)
    for key, value in dict(warmup=warmup, box_prob=box_prob).items():
        _check(key, value, "a number in [0.0, 1.0]", lambda v: 0 <= v <= 1)
    # Checked now, not when first used: a bad value would otherwise surface after a whole epoch
    # (validation) or deep inside torch / NumPy, leaving an empty run folder behind.
    _check("seed", seed, "a whole number >= 0", lambda v: float(v).is_integer() and v >= 0)
    for key, value, low in (("val_max_images", val_max_images, 1), ("threads", threads, 1), ("workers", workers, 0)):
        if value is not None:
            _check(key, value, f"a whole number >= {low} (or None)",
                   lambda v, low=low: float(v).is_integer() and v >= low)
    # 2.0 from a config file is 2 to torch and val, which take ints only.
    seed = int(seed)
    val_max_images, threads, workers = (None if v is None else int(v) for v in (val_max_images, threads, workers))
    state = None
    if resume:
        run_dir, state = saved_run(resume, project, name)
        saved = state.get("args", {})
        # A resumed run goes on with the settings its optimizer and schedule were made with: those
        # left at their defaults take the run's values, others must agree with them.
        # epochs too: the cosine schedule was laid out over the run's epochs.
        given = dict(epochs=epochs, batch=batch, lr=lr, warmup=warmup, weight_decay=weight_decay, trainable=trainable,
                     seed=seed, max_instances=max_instances, click_rounds=click_rounds, box_prob=box_prob,
                     grad_clip=grad_clip, imgsz=imgsz)
        (epochs, batch, lr, warmup, weight_decay, trainable, seed, max_instances, click_rounds, box_prob,
         grad_clip, imgsz) = resumed_settings(given, saved, model, data, run_dir, _defaults()).values()
        data = recorded_data(saved, run_dir) if data is None else data
    if threads:
        torch.set_num_threads(threads)
    dev = select_device(device)
    # A resumed run without a model object is rebuilt from its own last.pt: the weights would be
    # replaced by it anyway, and the model it started from may be a download or gone.
    from_last = state is not None and (model is None or isinstance(model, (str, os.PathLike)))
    net, config = resolve_model(run_dir / "last.pt" if from_last else model, imgsz)
    if config.family == "mobile_sam" and net.img_size != 1024:
        # TinyViT's input size is not in its weights: the checkpoint would reload at 1024 and give
        # wrong masks without an error.
        raise ConfigError(f"MobileSAM trains at imgsz=1024 only, not {net.img_size}: its checkpoints do not "
                          "record the input size and reload at 1024; leave imgsz out")
    ds = load_dataset(data)
    if len(ds) == 0:
        raise ValueError(f"the dataset {data!r} holds no annotated images")
    val_ds = None
    if val_data is not None and val_data != "":  # read before training: a wrong path should not cost an epoch
        val_ds = load_dataset(val_data)
        if len(val_ds) == 0:
            raise ConfigError(f"val_data={val_data!r} holds no annotated images")
    if state is not None:
        load_last(net, run_dir, state, loaded=from_last)
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
                box_prob=box_prob, grad_clip=grad_clip, data=record_name(data), model=record_name(model))
    if state is not None:  # the run's own model and data, not the last.pt it was rebuilt from
        args.update({k: state["args"][k] for k in ("model", "data") if k in state.get("args", {})})
    if workers is None:  # the GPU would wait on one process making samples; 2 CPU cores would not
        workers = min(8, max(1, (os.cpu_count() or 1) - 1)) if dev.type == "cuda" else 0
    mean, std = net.pixel_mean.view(1, 3, 1, 1), net.pixel_std.view(1, 3, 1, 1)
    warned_empty = False
    for epoch in range(start_epoch, epochs):
        net.train()
        order = np.random.default_rng([seed, epoch]).permutation(len(ds)).tolist()
        generator = torch.Generator(dev)
        generator.manual_seed(seed * 1_000_003 + epoch)
        samples = InputFrameSamples(ds, net.input_size, net.img_size, max_instances, seed, epoch)
        loader = torch.utils.data.DataLoader(samples, batch_size=batch, sampler=order, num_workers=workers,
                                             pin_memory=dev.type == "cuda", persistent_workers=False)
        bar = _progress(loader, f"epoch {epoch + 1}/{epochs}", verbose)
        sums, count, empty, t0 = {"loss": 0.0, "miou": 0.0}, 0, 0, time.time()
        for b in bar:
            empty += int((b["count"] == 0).sum())  # counted on the CPU copy: no device sync
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            masks, image_index = batch_prompts(b)
            if len(masks) == 0:
                sched.step()
                step += 1
                continue
            # Normalise, then zero the padding, as Sam.preprocess pads after normalising.
            x = (b["image"].float() - mean) / std * pad_mask(b["size"], net.img_size)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                with torch.set_grad_enabled(train_encoder):
                    emb = net.encode_image(x)
                loss, parts = batch_loss(net, emb, masks, image_index, generator, click_rounds, box_prob,
                                         loss_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            step += 1
            count += 1
            # Summed on the device: reading a value every step would make a GPU wait.
            sums["loss"] = sums["loss"] + loss.detach()
            sums["miou"] = sums["miou"] + parts["miou"]
            if verbose and (count % 10 == 1 or dev.type == "cpu"):
                bar.set_postfix(loss=f"{float(sums['loss']) / count:.4f}", miou=f"{float(sums['miou']) / count:.3f}",
                                lr=f"{sched.get_last_lr()[0]:.2e}")
        record: dict[str, Any] = dict(epoch=epoch + 1, step=step, time_s=round(time.time() - t0, 2),
                                      loss=float(sums["loss"]) / max(count, 1),
                                      train_miou=float(sums["miou"]) / max(count, 1))
        if empty:
            # Images whose annotations give no mask (empty COCO segmentation, YOLO box lines) teach
            # nothing; they are skipped, and said once, not every epoch.
            record["images_without_instances"] = empty
            if not warned_empty:
                warned_empty = True
                warn(f"{empty} of {len(ds)} training images have no usable instance masks (empty "
                     "segmentation, box-only labels); they are skipped", SkippedImageWarning)
        fitness = -record["loss"]
        if val_ds is not None:
            from .validate import val

            v = val(net, val_ds, max_images=val_max_images, kinds=("box", "point"), verbose=False, device=dev)
            record.update({f"val_{k}": v[k] for k in ("box", "point_best3")})
            if v["images_without_instances"]:
                record["val_images_without_instances"] = v["images_without_instances"]
            fitness = (v["box"] + v["point_best3"]) / 2
        history.append(record)
        net.eval()
        sd = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        atomic_torch_save(sd, run_dir / "last.pt")
        if fitness > best_fit:
            best_fit = fitness
            atomic_torch_save(sd, run_dir / "best.pt")
        atomic_torch_save(dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch + 1, step=step,
                               best_fitness=best_fit, history=history, args=args, weights_sum=weights_sum(sd)),
                          run_dir / "last_state.pt")
        if verbose:
            print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    return dict(save_dir=str(run_dir), last=str(run_dir / "last.pt"), best=str(run_dir / "best.pt"),
                epochs=epochs, steps=step, best_fitness=best_fit, history=history, args=args, model=net)


MODEL_AND_DATA = ("model= (a checkpoint to fine-tune, e.g. sam_b.pt, or an architecture for fresh weights, "
                  "e.g. sam_b)", "data=path/to/dataset (COCO .json, YOLO-seg folder or synthetic:N)")


def _require_model_and_data(model: Any, data: Any) -> None:
    """A :class:`ConfigError` naming what a new run lacks (a resumed one takes the run's own)."""
    missing = [text for text, value in zip(MODEL_AND_DATA, (model, data)) if value is None or value == ""]
    if missing:
        # No default model: sam_b (fresh random weights) and sam_b.pt (Meta's) are one character apart.
        raise ConfigError(f"train needs {' and '.join(missing)}, or resume=path/to/run to continue a run")


def _defaults() -> dict[str, Any]:
    """train's default values by name (a resumed run takes the run's value for those left so)."""
    return {k: p.default for k, p in inspect.signature(train).parameters.items()}


def _check(key: str, value: Any, want: str, ok: Callable[[float], bool]) -> None:
    """A :class:`ConfigError` naming ``key`` unless ``value`` is a finite number that passes ``ok``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and ok(value)):
        raise ConfigError(f"{key}={value!r}: expected {want}")


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
