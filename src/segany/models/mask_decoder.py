"""SAM's mask decoder: image and prompt embeddings → mask logits and IoU predictions."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts ``1 + num_multimask_outputs`` masks per prompt; returns the single or the multimask set."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embedding ``(1 or B, C, h, w)``, PE ``(1, C, h, w)``, sparse ``(B, N, C)``,
        dense ``(B, C, h, w)`` → masks ``(B, K, 4h, 4w)`` and IoU ``(B, K)``, K = 3 or 1.

        An image embedding of batch 1 is shared by all B prompts without being copied per prompt.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks ``(B, T, 4h, 4w)`` and IoU predictions ``(B, T)``."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        hs, src = self._attend(output_tokens, image_embeddings, image_pe, sparse_prompt_embeddings,
                               dense_prompt_embeddings)
        masks = self._masks_from_tokens(hs[:, 1 : 1 + self.num_mask_tokens, :], self.output_upscaling(src))
        return masks, self.iou_prediction_head(hs[:, 0, :])

    def _attend(
        self,
        output_tokens: torch.Tensor,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output tokens ``(T, C)`` + prompts through the two-way transformer → tokens ``(B, T + N, C)``
        and image features ``(B, C, h, w)``. A batch-1 image embedding is shared, not copied per prompt."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings), dim=1)
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != n_prompts:
            src = src.expand(n_prompts, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(n_prompts, -1, -1, -1), tokens)
        return hs, src.transpose(1, 2).reshape(b, c, h, w)

    def _masks_from_tokens(self, mask_tokens_out: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Mask tokens ``(B, T, C)`` × upscaled features ``(B, C', H, W)`` → mask logits ``(B, T, H, W)``."""
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
