"""SAM's training loss (Kirillov et al. 2023, §3 and appendix A): focal + dice on the mask logits,
weighted 20:1, plus the mean squared error of the IoU prediction."""

from __future__ import annotations

import torch
from torch.nn import functional as F

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over the pixels of each mask: ``(..., H, W)`` → ``(...)``."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 - Dice`` of the sigmoid probabilities, per mask: ``(..., H, W)`` → ``(...)``."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks ``(..., H, W)`` → ``(...)``; an empty prediction of an empty target counts 1."""
    pred, target = pred.bool().flatten(-2), target.bool().flatten(-2)
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of ``K`` candidate masks per prompt, as SAM trains them.

    ``logits`` ``(N, K, H, W)``, ``iou_pred`` ``(N, K)``, ``target`` ``(N, H, W)`` in {0, 1}. The mask
    loss backpropagates only through the best candidate (lowest loss) of each prompt, so an
    ambiguous prompt may keep several valid answers; the IoU head learns every candidate's IoU,
    which is what ranks them at inference. Returns the mean loss, the index of the best candidate
    per prompt, and the parts (detached) for logging.
    """
    t = target[:, None].expand_as(logits).to(logits.dtype)
    focal, dice = focal_loss(logits, t), dice_loss(logits, t)
    per_mask = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice  # (N, K)
    best = per_mask.detach().argmin(1)
    rows = torch.arange(len(best), device=logits.device)
    with torch.no_grad():
        true_iou = mask_iou(logits > 0, t > 0.5)
    iou_mse = F.mse_loss(iou_pred.float(), true_iou, reduction="none").mean(1)
    loss = per_mask[rows, best] + IOU_WEIGHT * iou_mse
    parts = dict(focal=focal[rows, best].mean().detach(), dice=dice[rows, best].mean().detach(),
                 iou=iou_mse.mean().detach(), miou=true_iou[rows, best].mean())
    return loss.mean(), best, parts
