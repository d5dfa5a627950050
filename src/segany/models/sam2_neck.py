"""SAM 2's image encoder around the Hiera trunk: the FPN neck and the sine position encoding.

State-dict keys and numerics are those of Meta's ``sam2.modeling.backbones.image_encoder``
(``ImageEncoder``, ``FpnNeck``) and ``sam2.modeling.position_encoding.PositionEmbeddingSine``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .common import conv1x1, is_plain


class PositionEmbeddingSine(nn.Module):
    """DETR-style 2-D sine/cosine encoding of a feature map's grid: ``(B, C, H, W)`` → ``(B, d, H, W)``.

    Holds no weights; the encoding of each grid size is computed once and cached (not a buffer,
    so it never enters the state dict).
    """

    def __init__(self, num_pos_feats: int, temperature: int = 10000, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError("num_pos_feats must be even")
        self.num_pos_feats = num_pos_feats // 2  # half for y, half for x
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def _grid(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Encoding ``(d, h, w)`` of an ``h × w`` grid."""
        key = (h, w, str(device))
        if key in self._cache:
            return self._cache[key]
        y = torch.arange(1, h + 1, dtype=torch.float32, device=device).view(-1, 1).expand(h, w)
        x = torch.arange(1, w + 1, dtype=torch.float32, device=device).view(1, -1).expand(h, w)
        if self.normalize:
            eps = 1e-6
            y = y / (y[-1:, :] + eps) * self.scale
            x = x / (x[:, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x, pos_y = x[:, :, None] / dim_t, y[:, :, None] / dim_t
        # Interleave sin (even channels) and cos (odd channels), as the reference does.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
        self._cache[key] = pos
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._grid(x.shape[-2], x.shape[-1], x.device)[None].repeat(x.shape[0], 1, 1, 1)


class FpnNeck(nn.Module):
    """Feature pyramid over the trunk's levels: a 1×1 lateral convolution per level to ``d_model``
    channels, and a top-down path (upsample ×2, add) into the levels in ``fpn_top_down_levels``.

    ``convs[0]`` belongs to the lowest-resolution level (``backbone_channel_list`` order).
    """

    def __init__(
        self,
        d_model: int,
        backbone_channel_list: list[int],
        fpn_top_down_levels: tuple[int, ...] | None = (2, 3),
        fpn_interp_model: str = "nearest",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for dim in backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=1))
            self.convs.append(lateral)
        self.position_encoding = PositionEmbeddingSine(d_model)
        self.fpn_interp_model = fpn_interp_model
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = list(levels)

    def forward(self, xs: list[torch.Tensor], with_pos: bool = True
                ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Trunk outputs (highest resolution first) → ``d_model``-channel maps in the same order,
        and their position encodings (``None`` entries when ``with_pos`` is false)."""
        n = len(self.convs) - 1
        out: list[torch.Tensor] = [None] * len(xs)  # type: ignore[list-item]
        pos: list[torch.Tensor | None] = [None] * len(xs)
        prev = None
        for i in range(n, -1, -1):  # from the lowest resolution up
            lateral = self.convs[n - i]  # a Sequential holding the conv: called if it holds more, or is hooked
            plain = is_plain(lateral, nn.Sequential) and list(lateral._modules) == ["conv"]
            lateral = conv1x1(xs[i], lateral.conv) if plain else lateral(xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                top_down = F.interpolate(
                    prev.to(dtype=torch.float32), scale_factor=2.0, mode=self.fpn_interp_model,
                    align_corners=None if self.fpn_interp_model == "nearest" else False, antialias=False,
                )
                prev = lateral + top_down
            else:
                prev = lateral
            out[i] = prev
            if with_pos:
                pos[i] = self.position_encoding(prev).to(prev.dtype)
        return out, pos


class Sam2ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck; ``scalp`` drops that many of the lowest-resolution levels.

    ``forward`` returns Meta's backbone dict: ``backbone_fpn`` (levels, highest resolution first,
    ``(B, d_model, S/4, S/4)`` … ``(B, d_model, S/16, S/16)`` with scalp 1), ``vision_pos_enc``
    (their position encodings) and ``vision_features`` (the lowest-resolution level).
    """

    def __init__(self, trunk: nn.Module, neck: FpnNeck, img_size: int = 1024, scalp: int = 1) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(f"trunk channels {trunk.channel_list} do not match the neck's "
                             f"{neck.backbone_channel_list}")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp
        self.img_size = img_size

    def forward(self, x: torch.Tensor, with_pos: bool = True) -> dict[str, torch.Tensor | list]:
        features, pos = self.neck(self.trunk(x), with_pos=with_pos)
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
