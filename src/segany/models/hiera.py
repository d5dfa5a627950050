"""The Hiera image trunk of SAM 2 (tiny, small, base+, large and custom sizes).

A hierarchical ViT: a 7×7 stride-4 patch embedding, then four stages whose resolution halves
(query pooling in the first block of each new stage) while the width and head count double.
Most blocks attend inside windows; a few "global" blocks attend over the whole map.

State-dict keys and numerics are those of Meta's ``sam2.modeling.backbones.hieradet.Hiera``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import Scratch, linear_layer, mlp_in_chunks, plain_inside
from .windows import window_partition, window_unpartition


# Tokens a windowed block takes at a time in CPU inference (MultiScaleBlock.forward).
CPU_BAND_TOKENS = 8192


class Hiera(nn.Module):
    """Normalised image ``(B, 3, S, S)`` → one feature map per stage, highest resolution first:
    ``(B, C, S/4, S/4)``, ``(B, 2C, S/8, S/8)``, ``(B, 4C, S/16, S/16)``, ``(B, 8C, S/32, S/32)``.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: tuple[int, ...] = (2, 3, 16, 3),
        global_att_blocks: tuple[int, ...] = (12, 16, 20),
        window_spec: tuple[int, ...] = (8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError("window_spec needs one window size per stage")
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        if not 0 <= q_pool <= len(stages) - 1:
            raise ValueError(f"q_pool must be in 0..{len(stages) - 1}")
        q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]

        self.patch_embed = PatchEmbed(embed_dim)
        # Windowed positional embedding (arXiv:2311.05613): a small background table interpolated
        # to the feature size plus a per-window table tiled over it.
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self._pos_cache: tuple[tuple, tuple[torch.Tensor, ...], torch.Tensor] | None = None

        self.blocks = nn.ModuleList()
        stage = 0
        dim = embed_dim
        for i in range(sum(stages)):
            dim_out = dim
            # The window size lags a block behind the stage: the first block of a stage pools its
            # queries from the previous stage's windows, so it keeps that stage's window size.
            window = 0 if i in global_att_blocks else window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    dim, dim_out, num_heads, mlp_ratio=mlp_ratio, window_size=window,
                    q_stride=q_stride if i in q_pool_blocks else None,
                )
            )
            dim = dim_out
        # Channels of the outputs, lowest resolution first (the order the FPN neck lists them in).
        self.channel_list = [self.blocks[i].dim_out for i in self.stage_ends[::-1]]

    def _get_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        """Positional embedding ``(1, h, w, C)`` for an ``h × w`` token map. Without autograd the
        last one is reused while the size and both tables are unchanged (the bicubic resize took
        ~30 ms of a CPU encode of Hiera-T)."""
        tables = (self.pos_embed, self.pos_embed_window)
        # Not under autograd (the graph must reach the tables) nor torch.compile (which traces it).
        reuse = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        cached = self._pos_cache
        if (reuse and cached is not None and cached[0] == tuple(hw)
                and all(a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                        for a, b in zip(cached[1], tables))):
            return cached[2]  # the tables are compared by value (~10k numbers): no stale reuse
        pos = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        win = self.pos_embed_window
        pos = (pos + win.tile([p // w for p, w in zip(pos.shape, win.shape)])).permute(0, 2, 3, 1)
        if reuse:
            self._pos_cache = (tuple(hw), tuple(t.detach().clone() for t in tables), pos)
        return pos

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)  # (B, H, W, C)
        x = x + self._get_pos_embed(x.shape[1:3])
        outputs = []
        scratch = Scratch.wanted(x) if plain_inside(self) else None  # (see vit.ImageEncoderViT.forward)
        for i, blk in enumerate(self.blocks):
            x = blk(x) if scratch is None else blk(x, scratch)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class PatchEmbed(nn.Module):
    """``(B, 3, H, W)`` → ``(B, H/4, W/4, embed_dim)`` with an overlapping 7×7 stride-4 convolution."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block on ``(B, H, W, dim)``; with ``q_stride`` it halves the resolution
    and widens to ``dim_out`` (the shortcut is projected and pooled the same way)."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        window_size: int = 0,
        q_stride: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=self.pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = GeluMLP(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """``(B, H, W, dim)`` → ``(B, H', W', dim_out)``; ``scratch``: buffers shared by the blocks of one pass
        (CPU inference), which then takes a large map a band of whole windows' rows at a time."""
        rows = _band_rows(x, self.window_size) if scratch is not None else 0
        if not rows:
            return self._forward(x, scratch)
        # Every step is per token, per window, or a pooling inside a window, so a band of whole
        # windows' rows computes its rows of the whole map's output (the last band padded at the
        # bottom as the map would be; products of other shapes may round differently, ~1e-6).
        # A band's q/k/v and hidden layers stay in cache, where those of SAM 2's first stage
        # (up to 151 MB) would be page-faulted in afresh every pass.
        return torch.cat([self._forward(x[:, r : r + rows], scratch) for r in range(0, x.shape[1], rows)], dim=1)

    def _forward(self, x: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
        # With hooks or stand-ins in the block, each module is called, as in the reference.
        fused = plain_inside(self, attn=MultiScaleAttention, mlp=GeluMLP)
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = _pool(linear_layer(x, self.proj), self.pool)

        window = self.window_size
        h, w = x.shape[1:3]
        if window > 0:
            x, pad_hw = window_partition(x, window, scratch=scratch)
        x = self.attn.attend(x, scratch) if fused else self.attn(x)
        if self.window_size > 0:
            if self.q_stride:
                # Query pooling shrank every window (and the map) by the stride.
                window = self.window_size // self.q_stride[0]
                h, w = shortcut.shape[1:3]
                pad_hw = (h + (window - h % window) % window, w + (window - w % window) % window)
            x = window_unpartition(x, window, pad_hw, (h, w))
        if not fused:
            x = shortcut + x
            return x + self.mlp(self.norm2(x))
        # The output projection is per token: it runs after unpartitioning (no padding tokens),
        # and the shortcuts are added as the products are written.
        x = linear_layer(x, self.attn.proj, residual=shortcut)
        return mlp_in_chunks(x, *self.mlp.layers, norm=self.norm2, residual=x)


class MultiScaleAttention(nn.Module):
    """Attention on ``(B, H, W, dim)`` → ``(B, H', W', dim_out)``; queries optionally max-pooled."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_layer(self.attend(x), self.proj)

    def attend(self, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """``(B, H, W, dim)`` → the heads' outputs ``(B, H', W', dim_out)``, before the output projection;
        ``scratch``: where q, k and v may be written."""
        b, h, w, _ = x.shape
        out = None if scratch is None else scratch.take_output("qkv", x, self.qkv.out_features)
        qkv = linear_layer(x, self.qkv, out=out).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = torch.unbind(qkv, 2)  # each (B, H*W, heads, C/heads)
        if self.q_pool is not None:
            q = _pool(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x.transpose(1, 2).reshape(b, h, w, -1)


class GeluMLP(nn.Module):
    """Two linear layers with GELU between them (``layers.0``/``layers.1`` keys, as sam2's ``MLP``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_in_chunks(x, *self.layers)


def _band_rows(x: torch.Tensor, window: int) -> int:
    """Rows a band of :data:`CPU_BAND_TOKENS` tokens holds, in whole windows, for a windowed block
    on a map larger than that; else 0 (one pass over the whole map)."""
    h, w = x.shape[1:3]
    if window == 0 or h * w <= CPU_BAND_TOKENS:
        return 0
    return max(1, CPU_BAND_TOKENS // w // window) * window


def _pool(x: torch.Tensor, pool: nn.Module | None) -> torch.Tensor:
    """Pool a channels-last ``(B, H, W, C)`` map."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
