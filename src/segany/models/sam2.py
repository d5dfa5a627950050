"""The SAM 2 / SAM 2.1 model for images: Hiera image encoder, FPN neck, prompt encoder and mask
decoder, with the engine interface of :class:`~segany.models.sam.Sam`.

State-dict keys are exactly those of Meta's ``SAM2Base``, so ``{"model": state_dict}`` files load
strictly. The video-only parts (memory attention, memory encoder, object-pointer projections and
embeddings) are built to the reference shapes and kept, unused by single images.

Numerics follow Meta's ``SAM2ImagePredictor``: images stretched to ``img_size × img_size``,
``no_mem_embed`` added to the stride-16 features, boxes fed as two corner points (labels 2, 3)
before the points, masks upsampled straight from the low-resolution logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import MLP, conv1x1
from .sam2_decoder import DecoderOutput, Sam2MaskDecoder, Sam2PromptEncoder
from .sam2_memory import MemoryAttention, MemoryEncoder
from .sam2_neck import Sam2ImageEncoder

# ImageNet statistics of sam2's transforms (images in 0..1).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

Features = dict[str, torch.Tensor]


class Sam2(nn.Module):
    """Segment Anything 2 / 2.1 (Hiera tiny, small, base+, large, and custom sizes) on images.

    ``encode_image`` returns a dict of features: ``image_embed`` ``(B, C, S/16, S/16)`` (with
    ``no_mem_embed``), ``high_res_feats_0`` ``(B, C/8, S/4, S/4)`` and ``high_res_feats_1``
    ``(B, C/4, S/8, S/8)`` (through the decoder's ``conv_s0``/``conv_s1``).
    """

    mask_threshold: float = 0.0
    resize_mode: str = "stretch"  # both sides to img_size (see engine.transforms)
    # sam2's predictor hands out its low-res logits clamped to ±32 (masks are made before), so
    # that is what a refinement prompt (masks=results.low_res_logits) feeds back.
    low_res_logits_limit: float | None = 32.0

    def __init__(
        self,
        image_encoder: Sam2ImageEncoder,
        sam_prompt_encoder: Sam2PromptEncoder,
        sam_mask_decoder: Sam2MaskDecoder,
        memory_attention: MemoryAttention,
        memory_encoder: MemoryEncoder,
        num_maskmem: int = 7,
        mem_dim: int = 64,
        no_obj_embed_spatial: bool = True,
        proj_tpos_enc_in_obj_ptrs: bool = True,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.sam_prompt_encoder = sam_prompt_encoder
        self.sam_mask_decoder = sam_mask_decoder
        hidden = image_encoder.neck.d_model
        self.hidden_dim, self.mem_dim, self.num_maskmem = hidden, mem_dim, num_maskmem

        # The single-image path uses only no_mem_embed: "no memory" added to the lowest level.
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden))
        # Video parts, kept for tracking (shapes as SAM2Base with the official configs).
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(num_maskmem, 1, 1, mem_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, hidden))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, hidden))
        self.obj_ptr_proj = MLP(hidden, hidden, hidden, 3)
        # SAM 2.1 only: a spatial "no object" embedding and a projection of the pointers' temporal
        # encoding (the tensors that tell a 2.1 checkpoint from a 2.0 one).
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, mem_dim)) if no_obj_embed_spatial else None
        self.obj_ptr_tpos_proj = nn.Linear(hidden, mem_dim) if proj_tpos_enc_in_obj_ptrs else nn.Identity()

        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    # -- engine interface ----------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        """Side of the square input (1024 for the official models)."""
        return self.image_encoder.img_size

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    @property
    def prompt_encoder(self) -> Sam2PromptEncoder:
        """The prompt encoder under SAM's attribute name (the engine reads ``mask_input_size``)."""
        return self.sam_prompt_encoder

    @property
    def mask_decoder(self) -> Sam2MaskDecoder:
        return self.sam_mask_decoder

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Every image is stretched to the square input, whatever its aspect ratio."""
        return self.img_size, self.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Stretched RGB ``(B, 3, S, S)`` in 0..255 → normalised; no padding.

        Scaled to 0..1 first, then normalised with sam2's statistics, the order of sam2's
        transforms (the same as SAM's 0..255 statistics up to float rounding).
        """
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"SAM 2 takes {self.img_size}×{self.img_size} input, got {tuple(x.shape[-2:])}")
        return (x / 255.0 - self.pixel_mean) / self.pixel_std

    def forward_image(self, x: torch.Tensor, with_pos: bool = True) -> dict:
        """Meta's ``SAM2Base.forward_image``: the backbone dict, with the two highest-resolution
        levels already through the decoder's ``conv_s0``/``conv_s1`` (done once per image)."""
        out = self.image_encoder(x, with_pos=with_pos)
        fpn = list(out["backbone_fpn"])
        if self.sam_mask_decoder.use_high_res_features:
            fpn[0] = conv1x1(fpn[0], self.sam_mask_decoder.conv_s0)
            fpn[1] = conv1x1(fpn[1], self.sam_mask_decoder.conv_s1)
        return {**out, "backbone_fpn": fpn}

    def encode_image(self, x: torch.Tensor) -> Features:
        """Preprocessed ``(B, 3, S, S)`` → the features prompts are decoded against (see class doc)."""
        fpn = self.forward_image(x, with_pos=False)["backbone_fpn"]
        feats = {"image_embed": fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)}
        for i, level in enumerate(fpn[:-1]):
            feats[f"high_res_feats_{i}"] = level
        return feats

    def decode(
        self,
        features: Features,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the input frame → low-res mask logits ``(B, K, S/4, S/4)`` and IoU ``(B, K)``.

        Features of one image (batch 1, shared by all B prompts) or of B images; points
        ``(B, N, 2)`` with labels ``(B, N)``; boxes ``(B, 4)``; mask_inputs ``(B, 1, S/4, S/4)``
        logits. With ``multimask_output=False`` an unstable single mask is replaced by the best
        of the three (as Meta's image predictor). See :meth:`decode_full` for object scores.
        """
        out = self.decode_full(features, points, boxes, mask_inputs, multimask_output)
        return out.masks, out.iou_pred

    def decode_full(
        self,
        features: Features,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> DecoderOutput:
        """As :meth:`decode`, returning also the object-score logits ``(B, 1)`` (> 0: the object
        is present) and the output tokens for object pointers. Mirrors ``SAM2ImagePredictor._predict``."""
        if boxes is not None:
            # Boxes are two corner points labelled 2 and 3, placed before any clicked points.
            corners = boxes.reshape(-1, 2, 2)
            dtype = points[1].dtype if points is not None else torch.int32
            corner_labels = torch.tensor([[2, 3]], dtype=dtype, device=boxes.device).repeat(corners.shape[0], 1)
            if points is not None:
                points = (torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))
            else:
                points = (corners, corner_labels)
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=mask_inputs)
        high_res = [features[k] for k in sorted(features) if k.startswith("high_res_feats_")]
        return self.sam_mask_decoder(
            image_embeddings=features["image_embed"],
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_res_features=high_res or None,
        )

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits ``(B, K, s, s)`` → logits ``(B, K, H, W)`` at the original size: one
        bilinear upsampling, as sam2 (the stretched input has no padding to crop). sam2's optional
        hole filling / sprinkle removal is off by default (``max_hole_area=0``) and not applied."""
        return F.interpolate(masks.float(), original_size, mode="bilinear", align_corners=False)
