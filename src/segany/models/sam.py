"""The SAM model: image encoder + prompt encoder + mask decoder, with SAM's pixel normalisation,
padding and mask upsampling. Pure tensors in, tensors out: resizing of images and prompts to the
model's input frame happens in :mod:`segany.engine`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .common import is_plain, plain_tree
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import ProjectedImage

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class PreparedImage(NamedTuple):
    """An image embedding and its decoder-side projections (:meth:`Sam.prepare_image`)."""

    embedding: torch.Tensor  # (1, C, h, w)
    projected: ProjectedImage | None  # the embedding plus the no-mask dense embedding, for the first decoder
    # block (None for a stand-in decoder)


class Sam(nn.Module):
    """Segment Anything (SAM ViT-B/L/H, MobileSAM, and custom sizes).

    State-dict keys are those of Meta's ``Sam`` (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``), so Meta's checkpoints load as they are.
    """

    mask_threshold: float = 0.0
    resize_mode: str = "longest_side"  # how the engine brings an image to the input frame (see engine.transforms)
    low_res_logits_limit: float | None = None  # Meta's SamPredictor returns them unclamped (cf. Sam2)

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    @property
    def img_size(self) -> int:
        """Side of the square input the encoder takes (1024 for the official models)."""
        return self.image_encoder.img_size

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resized RGB ``(B, 3, h, w)`` in 0..255 → normalised, zero-padded ``(B, 3, S, S)``."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, S, S)`` → image embeddings ``(B, 256, S/16, S/16)``."""
        return self.image_encoder(x)

    def prepare_image(self, image_embeddings: torch.Tensor) -> PreparedImage:
        """An image embedding ``(1, C, h, w)`` with what the decoder computes from it for every
        prompt, computed once: pass the result to :meth:`decode` in place of the embedding.
        Prompts with mask inputs use the plain embedding it keeps."""
        if not is_plain(self.mask_decoder, MaskDecoder):  # a stand-in decoder gets the embedding (see decode)
            return PreparedImage(image_embeddings, None)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        projected = self.mask_decoder.prepare_image(image_embeddings, self.prompt_encoder.get_dense_pe(), no_mask)
        return PreparedImage(image_embeddings, projected)

    def decode(
        self,
        image_embeddings: torch.Tensor | PreparedImage,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
        extent: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the input frame → low-res mask logits ``(B, K, 256, 256)`` and IoU ``(B, K)``.

        ``image_embeddings`` is ``(1, C, h, w)`` (shared by all B prompts), ``(B, C, h, w)``, or a
        :meth:`prepare_image` result; points ``(B, N, 2)`` with labels ``(B, N)``; boxes ``(B, 4)``
        (x1, y1, x2, y2); mask_inputs ``(B, 1, 256, 256)`` logits. ``extent``: the rows and
        columns of the logits the caller reads (:meth:`low_res_extent`); the logits returned then
        cover at least those (the top-left ``(B, K, ≥rows, ≥cols)``), at less cost.
        """
        image = image_embeddings
        # A hooked or stand-in decoder gets the reference's arguments: the embedding, and no extent.
        plain = is_plain(self.mask_decoder, MaskDecoder)
        if isinstance(image, PreparedImage):
            # The projection holds what the prompt encoder gave then: not if it has hooks or stand-ins now.
            reuse = mask_inputs is None and plain and image.projected is not None and plain_tree(self.prompt_encoder)
            image = image.projected if reuse else image.embedding
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        return self.mask_decoder(
            image_embeddings=image,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **({"extent": extent} if plain else {}),
        )

    def low_res_extent(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of the low-res logits that reach the unpadded ``input_size`` region, all
        that :meth:`postprocess_masks` reads: bilinear upsampling (align_corners=False) by an
        integer factor reads at most ``ceil(n / factor) + 1`` source cells for ``n`` output cells."""
        s = self.prompt_encoder.mask_input_size[0]
        factor = self.img_size // s
        return min(s, math.ceil(input_size[0] / factor) + 1), min(s, math.ceil(input_size[1] / factor) + 1)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Size ``(h', w')`` of an ``h × w`` image after resizing its longest side to :attr:`img_size`."""
        scale = self.img_size * 1.0 / max(h, w)
        # At least one pixel: past img_size·2 : 1 the short side would round to nothing.
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits ``(B, K, s, s)`` → logits at the original size ``(B, K, H, W)``.

        Meta's steps (upsample to the padded input, drop the padding, upsample to the original
        size) with the same values, but the first upsampling covers only the low-res rows and
        columns that reach the unpadded region: bilinear upsampling (align_corners=False) by an
        integer factor reads at most ``ceil(n / factor)`` source cells for ``n`` output cells, so
        cropping first changes nothing and saves the padded part of the work.
        """
        factor = self.img_size // self.prompt_encoder.mask_input_size[0]
        rows, cols = self.low_res_extent(input_size)
        x = F.interpolate(masks[..., :rows, :cols], (rows * factor, cols * factor), mode="bilinear",
                          align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        if tuple(x.shape[-2:]) == tuple(original_size):  # resizing to the same size changes nothing
            return x
        return F.interpolate(x, original_size, mode="bilinear", align_corners=False)
