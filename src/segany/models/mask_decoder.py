"""SAM's mask decoder: image and prompt embeddings → mask logits and IoU predictions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import MLP, LayerNorm2d, activate, is_plain, linear, plain_tree
from .transformer import ProjectedImage, TwoWayTransformer


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
        extent: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embedding ``(1 or B, C, h, w)``, PE ``(1, C, h, w)``, sparse ``(B, N, C)``,
        dense ``(B, C, h, w)`` → masks ``(B, K, 4h, 4w)`` and IoU ``(B, K)``, K = 3 or 1.

        An image embedding of batch 1 is shared by all B prompts without being copied per prompt.
        ``extent``: (rows, cols) of the masks the caller reads. The upscaling is per image token
        (each makes its own 4×4 block of mask cells), so only the tokens covering those rows and
        columns are upscaled and the masks are the top-left ``(B, K, 4⌈rows/4⌉, 4⌈cols/4⌉)``: for
        an image padded to a square, the padding's share of the upscaling is skipped.
        """
        sl = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, sl, extent
        )
        return masks, iou_pred[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_slice: slice = slice(None),
        extent: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of the ``mask_slice`` mask tokens ``(B, T', 4h, 4w)`` (all by default; see
        :meth:`forward` for ``extent``) and IoU predictions of all ``num_mask_tokens`` ``(B, T)``."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        every = not plain_tree(self.output_hypernetworks_mlps)  # its hooks see every mask token, as in the reference
        wanted = list(range(self.num_mask_tokens))[slice(None) if every else mask_slice]
        # Only the IoU token and the wanted mask tokens are read: the others skip the final attention.
        hs, src = self._attend(output_tokens, image_embeddings, image_pe, sparse_prompt_embeddings,
                               dense_prompt_embeddings, out_tokens=[0] + [1 + i for i in wanted])
        fused = self._upscaling_fusable()
        if not fused:  # hooks or stand-ins: the modules called on the whole image, in the reference's order
            upscaled = self.output_upscaling(src)
        hyper_in = self._hyper_in(hs[:, 1:, :], wanted)
        if fused:
            if extent is not None:  # the image tokens whose 4×4 blocks of mask cells cover the extent
                src = src[:, :, : -(-extent[0] // 4), : -(-extent[1] // 4)]
            masks = self._upscaled_masks(src, hyper_in)
        else:
            masks = self._masks_times(hyper_in, upscaled)
        return masks[:, mask_slice] if every else masks, self.iou_prediction_head(hs[:, 0, :])

    def _upscaling_fusable(self) -> bool:
        """Whether ``output_upscaling`` is what :meth:`_upscaled_masks` computes: SAM's two 2×2,
        stride-2 transposed convolutions with a LayerNorm2d and exact GELUs, without hooks or stand-ins."""
        seq = self.output_upscaling
        return (type(seq) is nn.Sequential and plain_tree(seq)
                and [type(m) for m in seq] == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU]
                and seq[2].approximate == seq[4].approximate == "none"
                and all(seq[i].kernel_size == seq[i].stride == (2, 2) and seq[i].padding == seq[i].output_padding
                        == (0, 0) and seq[i].dilation == (1, 1) and seq[i].groups == 1 and seq[i].bias is not None
                        for i in (0, 3)))

    def _attend(
        self,
        output_tokens: torch.Tensor,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        out_tokens: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output tokens ``(T, C)`` + prompts through the two-way transformer → tokens ``(B, T + N, C)``
        (or just ``out_tokens`` of them) and image features ``(B, C, h, w)`` (a channels-last view
        of the transformer's image tokens).

        A batch-1 image embedding with the same dense embedding for every prompt (no mask inputs)
        is passed on as one shared image, not copied per prompt (unless the transformer has hooks
        or is a stand-in: then it gets the reference's per-prompt copies)."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings), dim=1)
        image = image_embeddings  # a ProjectedImage from prepare_image has the dense embedding in it
        if not isinstance(image, ProjectedImage):
            dense = dense_prompt_embeddings
            if image.shape[0] == 1 and (dense.shape[0] == 1 or dense.stride(0) == 0):
                dense = dense[:1]
            image = image + dense
        h, w = image_pe.shape[-2:]
        if is_plain(self.transformer, TwoWayTransformer):
            hs, keys = self.transformer(image, image_pe, tokens, out_tokens)
        else:  # hooks or a stand-in: the reference's arguments (each prompt's own copy of the image and
            # its PE, which a pre-hook may edit in place) and every token
            if isinstance(image, ProjectedImage):
                image = image.keys.transpose(1, 2).reshape(1, -1, h, w)  # (with the dense embedding in it)
            copies = (n_prompts // image.shape[0], 1, 1, 1)
            hs, keys = self.transformer(image.repeat(copies), image_pe.repeat(n_prompts, 1, 1, 1), tokens)
            hs = hs if out_tokens is None else hs[:, out_tokens]
        return hs, keys.reshape(n_prompts, h, w, -1).permute(0, 3, 1, 2)

    def prepare_image(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                      dense_prompt_embedding: torch.Tensor) -> ProjectedImage:
        """One image embedding ``(1, C, h, w)`` with the dense embedding every prompt without a
        mask input gets, prepared once for any number of prompts: pass it as
        ``image_embeddings`` (with no dense embedding of its own) instead of the embedding."""
        image = image_embedding + dense_prompt_embedding
        if not is_plain(self.transformer, TwoWayTransformer):  # its hooks see the reference's inputs (_attend)
            return ProjectedImage.unprojected(image, image_pe)
        return self.transformer.project(image, image_pe)

    def _hyper_in(self, mask_tokens_out: torch.Tensor, mask_indices: list[int] | None = None) -> torch.Tensor:
        """Mask tokens ``(B, T', C)``, those of ``mask_indices`` (all by default) → per-token weights
        of the upscaled features ``(B, T', C')``."""
        mask_indices = range(mask_tokens_out.shape[1]) if mask_indices is None else mask_indices
        mlps = self.output_hypernetworks_mlps
        return torch.stack([mlps[i](mask_tokens_out[:, j, :]) for j, i in enumerate(mask_indices)], dim=1)

    def _upscaled_masks(self, src: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """Image features ``(B, C, h, w)`` (channels-last) and token weights ``(B, T, C')`` → mask
        logits ``(B, T, 4h, 4w)``.

        ``output_upscaling`` is two 2×2, stride-2 transposed convolutions: each input pixel maps to
        its own 2×2 output block, so each is one matrix product over channels-last pixels. The
        LayerNorm and GELUs act per pixel and the hypernetwork product per output pixel, so all of
        it runs on the (pixel, sub-pixel, channel) layout, and only the masks are put in image
        order at the end. Same values as the convolution path (within float rounding).
        """
        dc1, ln1, _, dc2, _ = self.output_upscaling  # GELUs, applied to the products' own outputs
        b, c, h, w = src.shape
        x = src.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view unless src was cut to fewer columns
        c1, c2 = dc1.out_channels, dc2.out_channels
        # weight (C_in, C_out, 2, 2) → (2·2·C_out, C_in): output columns ordered (dy, dx, channel)
        x = linear(x, dc1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c), dc1.bias.repeat(4))
        x = activate(F.layer_norm(x.view(-1, c1), (c1,), ln1.weight, ln1.bias, ln1.eps), "gelu")
        x = linear(x, dc2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1), dc2.bias.repeat(4), activation="gelu")
        t = hyper_in.shape[1]
        masks = hyper_in @ x.view(b, h * w * 16, c2).transpose(1, 2)  # pixels in (y, x, dy, dx, dy2, dx2) order
        # → row 4y + 2dy + dy2, column 4x + 2dx + dx2, in two steps of whole (dy2, dx2) blocks
        masks = masks.view(b, t, h, w, 2, 2, 4).transpose(3, 4).reshape(b, t, 2 * h, 2 * w, 2, 2)
        return masks.transpose(3, 4).reshape(b, t, 4 * h, 4 * w)

    def _masks_from_tokens(self, mask_tokens_out: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Mask tokens ``(B, T, C)`` × upscaled features ``(B, C', H, W)`` → mask logits ``(B, T, H, W)``."""
        return self._masks_times(self._hyper_in(mask_tokens_out), upscaled)

    @staticmethod
    def _masks_times(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Token weights ``(B, T, C')`` × upscaled features ``(B, C', H, W)`` → mask logits ``(B, T, H, W)``."""
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, h * w)).view(b, -1, h, w)
