"""SAM 2's prompt encoder and mask decoder.

Both extend SAM's (:mod:`.prompt_encoder`, :mod:`.mask_decoder`): the prompt encoder also tags
points labelled 2 and 3 (SAM 2 feeds boxes as two corner points); the decoder adds the
high-resolution feature path (``conv_s0``/``conv_s1``), the object-score token and head, the
sigmoid IoU head and the dynamic single-mask fallback. State-dict keys and numerics are those of
Meta's ``sam2.modeling.sam``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .common import MLP
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer


class Sam2PromptEncoder(PromptEncoder):
    """SAM's prompt encoder; point labels 2/3 (box corners) get the corner embeddings too."""

    point_labels = 4  # boxes enter SAM 2 as two corner points labelled 2 and 3


def sam2_two_way_transformer(depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
                             mlp_dim: int = 2048) -> TwoWayTransformer:
    """SAM's two-way transformer with sam2's key names: sam2 writes each block's MLP as
    ``mlp.layers.0``/``mlp.layers.1`` (the same Linear-ReLU-Linear as SAM's ``lin1``/``lin2``)."""
    transformer = TwoWayTransformer(depth, embedding_dim, num_heads, mlp_dim)
    for layer in transformer.layers:
        layer.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2)
    return transformer


class DecoderOutput(NamedTuple):
    """What :class:`Sam2MaskDecoder` returns for B prompts and K masks per prompt."""

    masks: torch.Tensor  # (B, K, 4h, 4w) low-resolution mask logits
    iou_pred: torch.Tensor  # (B, K) predicted IoU (sigmoid-bounded for the official models)
    sam_tokens: torch.Tensor  # (B, 1 or 3, C) output tokens the video model turns into object pointers
    object_score_logits: torch.Tensor  # (B, 1) > 0 when the object is present


class Sam2MaskDecoder(MaskDecoder):
    """Predicts ``1 + num_multimask_outputs`` masks per prompt from the stride-16 image embedding
    and the stride-4/stride-8 high-resolution features."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__(transformer_dim, transformer, num_multimask_outputs, iou_head_depth, iou_head_hidden_dim)
        self.iou_prediction_head.sigmoid_output = iou_prediction_use_sigmoid
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
            self.pred_obj_score_head = (MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp
                                        else nn.Linear(transformer_dim, 1))
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # Applied once per image in ``Sam2.forward_image``, not per prompt.
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        # With one mask asked for, fall back to the best multimask output when the single-mask
        # output is unstable (Meta's image predictor enables this; build_sam2's postprocessing).
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> DecoderOutput:
        """Image embedding ``(1 or B, C, h, w)``, PE ``(1, C, h, w)``, sparse ``(B, N, C)``,
        dense ``(B, C, h, w)``, high-res features ``[(1 or B, C/8, 4h, 4w), (1 or B, C/4, 2h, 2w)]``
        (already through ``conv_s0``/``conv_s1``) → :class:`DecoderOutput` with K = 3 or 1.
        """
        masks, iou_pred, mask_tokens_out, obj_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        # The object pointer always comes from the single-mask token, except with multimask
        # output in models trained to use the multimask tokens for it.
        multi_tokens = multimask_output and self.use_multimask_token_for_obj_ptr
        sam_tokens = mask_tokens_out[:, 1:] if multi_tokens else mask_tokens_out[:, 0:1]
        return DecoderOutput(masks, iou_pred, sam_tokens, obj_logits)

    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All masks ``(B, T, 4h, 4w)``, IoU ``(B, T)``, mask tokens ``(B, T, C)``, object logits ``(B, 1)``."""
        heads = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            heads.insert(0, self.obj_score_token.weight)
        s = 1 if self.pred_obj_scores else 0  # index of the IoU token
        output_tokens = torch.cat(heads, dim=0)
        # The prompt tokens after the output tokens are not read: they skip the final attention.
        hs, src = self._attend(output_tokens, image_embeddings, image_pe, sparse_prompt_embeddings,
                               dense_prompt_embeddings, out_tokens=list(range(len(output_tokens))))
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens, :]

        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this decoder needs the high-resolution features (feat_s0, feat_s1)")
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(src) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)
        else:
            upscaled = self.output_upscaling(src)
        masks = self._masks_from_tokens(mask_tokens_out, upscaled)

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            obj_logits = self.pred_obj_score_head(hs[:, 0, :])
        else:  # no head: "object present" (sigmoid(10) ≈ 1), as the reference
            obj_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
        return masks, iou_pred, mask_tokens_out, obj_logits

    def _stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU of the masks thresholded at ±delta, ``(B, K, H, W)`` → ``(B, K)``."""
        flat = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        area_i = torch.sum(flat > delta, dim=-1).float()
        area_u = torch.sum(flat > -delta, dim=-1).float()
        return torch.where(area_u > 0, area_i / area_u, 1.0)

    def _dynamic_multimask_via_stability(self, all_masks: torch.Tensor, all_iou: torch.Tensor
                                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The single-mask output ``(B, 1, H, W)``, ``(B, 1)``, replaced by the multimask output with
        the highest predicted IoU where its stability is below the threshold."""
        multi_masks, multi_iou = all_masks[:, 1:], all_iou[:, 1:]
        best = torch.argmax(multi_iou, dim=-1)
        rows = torch.arange(multi_iou.shape[0], device=all_iou.device)
        best_masks = multi_masks[rows, best].unsqueeze(1)
        best_iou = multi_iou[rows, best].unsqueeze(1)
        single_masks, single_iou = all_masks[:, 0:1], all_iou[:, 0:1]
        stable = self._stability_scores(single_masks) >= self.dynamic_multimask_stability_thresh
        masks = torch.where(stable[..., None, None].expand_as(single_masks), single_masks, best_masks)
        iou = torch.where(stable.expand_as(single_iou), single_iou, best_iou)
        return masks, iou
