"""Training batches: samples brought into the model's input frame by DataLoader workers, then
prompted and scored on the device, every prompt of every image in one decoder call per round.

The per-sample work (making or reading the image, resizing, choosing the instances, flipping) is
plain NumPy in the workers; prompt simulation (:mod:`.prompts_sim`) and the loss run batched on
the device, so a GPU is not left waiting on Python loops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..data.datasets import SegDataset
from ..engine.transforms import image_to_tensor


def input_frame(image: np.ndarray, masks: np.ndarray, size: tuple[int, int], img_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and its masks resized as the model resizes images and zero-padded to ``img_size``:
    ``(3, S, S)`` uint8 RGB and ``(N, S, S)`` bool."""
    x = image_to_tensor(np.ascontiguousarray(image), size, torch.device("cpu"))[0]
    x = F.pad(x, (0, img_size - size[1], 0, img_size - size[0])).to(torch.uint8)
    if len(masks) == 0:  # an image without instances: interpolate refuses empty batches, so no resize
        return x, torch.zeros((0, img_size, img_size), dtype=torch.bool)
    m = torch.from_numpy(np.ascontiguousarray(masks))[:, None].float()
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m, size, mode="bilinear", align_corners=False)
    m = F.pad(m[:, 0] > 0.5, (0, img_size - size[1], 0, img_size - size[0]))
    return x, m


class InputFrameSamples(torch.utils.data.Dataset):
    """Samples of ``data`` for one epoch, ready to batch: ``image`` ``(3, S, S)`` uint8, ``masks``
    ``(M, S, S)`` bool (up to ``max_instances`` non-empty instances, chosen at random, then zero
    masks), ``count`` (how many are real) and ``size`` (the unpadded ``h', w'``).

    ``geometry(h, w)`` gives the resized size (the model's ``input_size``). Randomness comes from
    ``(seed, epoch, index)``, so a sample is the same whichever worker makes it.
    """

    def __init__(self, data: SegDataset, geometry: Any, img_size: int, max_instances: int, seed: int,
                 epoch: int, flip: bool = True) -> None:
        self.data, self.geometry, self.img_size = data, geometry, img_size
        self.max_instances, self.seed, self.epoch, self.flip = max_instances, seed, epoch, flip

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.data[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, masks = sample.image, sample.masks
        if self.flip and rng.random() < 0.5:  # the cheapest augmentation that keeps every mask valid
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        size = self.geometry(*image.shape[:2])
        x, m = input_frame(image, masks, size, self.img_size)
        keep = torch.nonzero(m.flatten(1).any(1)).flatten().numpy()
        keep = rng.permutation(keep)[: self.max_instances]
        out = torch.zeros((self.max_instances, self.img_size, self.img_size), dtype=torch.bool)
        out[: len(keep)] = m[torch.as_tensor(keep, dtype=torch.long)]
        return dict(image=x, masks=out, count=torch.tensor(len(keep)), size=torch.tensor(size))


def batch_prompts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The real instances of a collated batch as prompts: ``(P, S, S)`` masks and the index of the
    image each belongs to ``(P,)``."""
    count, masks = batch["count"], batch["masks"]
    valid = torch.arange(masks.shape[1], device=count.device)[None] < count[:, None]
    image_index = torch.arange(len(count), device=count.device)[:, None].expand_as(valid)
    return masks[valid], image_index[valid]


def pad_mask(sizes: torch.Tensor, img_size: int) -> torch.Tensor:
    """``(B, 1, S, S)`` 1 inside each image's unpadded region, 0 in its padding."""
    r = torch.arange(img_size, device=sizes.device)
    rows = r[None, :] < sizes[:, :1]
    cols = r[None, :] < sizes[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[:, None].float()
