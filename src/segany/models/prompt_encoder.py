"""SAM's prompt encoder: points, boxes and masks → sparse and dense prompt embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d, plain_tree


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of ``(x, y)`` coordinates with a fixed random Gaussian matrix."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` coordinates in [0, 1] → ``(..., 2 * num_pos_feats)``."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an ``(H, W)`` grid → ``(C, H, W)``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``(B, N, 2)`` pixel coordinates in an ``(H, W)`` input → ``(B, N, C)``."""
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._pe_encoding((coords * scale).float())


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Point labels: 1 positive, 0 negative, -1 padding; 2 and 3 are the box corners.
    """

    point_labels = 2  # point labels that get an embedding in _embed_points (SAM: 0 and 1)

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None  # (key of the matrix, get_dense_pe())

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, ``(1, C, h, w)``.

        Kept between calls (it costs about a millisecond on a CPU, per prompt call) and made
        again when the Gaussian matrix changes: loaded, moved, cast, or edited in place.
        """
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        try:
            key = (matrix._version, matrix.data_ptr(), matrix.dtype, torch.is_inference_mode_enabled())
        except RuntimeError:  # an inference-mode tensor keeps no version: no caching
            key = None
        if key is None or not plain_tree(self.pe_layer):  # (hooks or a stand-in: called each time, as in the reference)
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        if self._dense_pe is None or self._dense_pe[0] != key:
            # channels-last memory: the decoder reads it as (h*w, C) tokens without a copy
            pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            self._dense_pe = (key, pe.contiguous(memory_format=torch.channels_last))
        return self._dense_pe[1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``(B, N, 2)`` points, ``(B, N)`` labels → ``(B, N (+1 pad), C)``."""
        points = points + 0.5  # to the pixel centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight.expand_as(emb), emb)
        for label in range(self.point_labels):
            emb = emb + (labels == label) * self.point_embeddings[label].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` boxes → two corner tokens ``(B, 2, C)``."""
        coords = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corners = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corners

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse ``(B, N, C)`` and dense ``(B, C, h, w)`` embeddings.

        ``masks`` are low-resolution inputs ``(B, 1, 4h, 4w)`` (256×256 for SAM).
        """
        bs = _batch_size(points, boxes, masks)
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


def _batch_size(points, boxes, masks) -> int:
    if points is not None:
        return points[0].shape[0]
    if boxes is not None:
        return boxes.shape[0]
    if masks is not None:
        return masks.shape[0]
    return 1
