"""MobileSAM's image encoder: TinyViT-5M (a conv stage, then three stages of windowed attention).

State-dict keys and numerics are those of MobileSAM's ``TinyViT`` (``mobile_sam.modeling``), so
``mobile_sam.pt`` loads strictly; that includes the unused ImageNet ``norm_head``/``head``, which the
checkpoint carries. Stochastic depth, checkpointing and layer-wise lr decay (training only) are left out.

Strides: 4 in the patch embedding, then 2 in each patch merging but the last, which keeps the
resolution (MobileSAM's change to TinyViT), so four stages give an ``S/16`` embedding like SAM's ViT.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import (LayerNorm2d, activate, is_plain, linear, linear_layer, mlp_in_chunks, onednn_products,
                     plain_inside)
from .windows import window_partition, window_unpartition

# Rows a band of MobileSAM's first stage at a time (MBConv._forward_in_bands), in CPU inference once
# the expanded activations of the whole map would pass this many elements.
CPU_BAND_ROWS = 16
CPU_BANDS_MIN_ELEMENTS = 1 << 22


class Conv2dBN(nn.Module):
    """Bias-free conv followed by batch norm (``c``/``bn`` keys)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, activation: str | None = None
                ) -> torch.Tensor:
        """conv → batch norm → ``+ residual`` if given → ``activation`` (``"gelu"``) if given."""
        bn, c = self.bn, self.c
        if self.training or not (is_plain(c, nn.Conv2d) and c.bias is None and is_plain(bn, nn.BatchNorm2d)
                                 and bn.affine and bn.track_running_stats):  # (else the modules themselves)
            y = self.bn(self.c(x))
            y = y if residual is None else y + residual
            return y if activation is None else activate(y, activation)
        # In eval the batch norm is an affine map per channel: fold it into the conv (one pass
        # over the activations instead of two; the weights are small).
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = c.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        if c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1:
            # A 1×1 conv is a linear map of the channels: one matrix product on the channels-last
            # data (PyTorch's CPU conv with a bias falls back to a slow kernel here), with the
            # activation or the residual applied as it is written (see common.linear).
            fuse = residual is None  # linear applies an activation before a residual, not after
            y = linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias, activation=activation if fuse else None,
                       residual=None if residual is None else residual.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if fuse:
                return y
        else:
            y = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
            if residual is not None:  # y is new: in place unless autograd keeps it
                y = y + residual if torch.is_grad_enabled() else y.add_(residual)
        return y if activation is None else activate(y, activation)


class PatchEmbed(nn.Module):
    """Two stride-2 3×3 convs: ``(B, C, H, W)`` → ``(B, embed_dim, H/4, W/4)``."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (plain_inside(self) and [type(m) for m in self.seq] == [Conv2dBN, nn.GELU, Conv2dBN]
                and self.seq[1].approximate == "none"):  # hooks or stand-ins: modules called one by one
            return self.seq(x)
        return self.seq[2](self.seq[0](x, activation="gelu"))  # seq[1], the GELU, applied by seq[0]


class MBConv(nn.Module):
    """Inverted residual block (1×1 expand, 3×3 depthwise, 1×1 project) on ``(B, C, H, W)``."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        # Zero-initialised last BN: a fresh block starts as the identity (before the final GELU).
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not plain_inside(self, conv1=Conv2dBN, conv2=Conv2dBN, conv3=Conv2dBN):  # (see PatchEmbed)
            return F.gelu(self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x))))) + x)
        if _in_bands(self, x):
            return self._forward_in_bands(x)
        y = self.conv2(self.conv1(x, activation="gelu"), activation="gelu")
        return self.conv3(y, residual=x, activation="gelu")

    def _forward_in_bands(self, x: torch.Tensor) -> torch.Tensor:
        """The same block a band of :data:`CPU_BAND_ROWS` rows at a time, each band with the rows
        above and below it that the 3×3 conv reads (its outputs there are dropped). The expanded
        activations of a band stay in cache, where those of the whole map (67 MB for MobileSAM's
        first stage) would be written, page-faulted in afresh and read back at every step."""
        h = x.shape[2]
        tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C): contiguous for channels-last x
        out = torch.empty_like(tokens)
        for r0 in range(0, h, CPU_BAND_ROWS):
            r1 = min(h, r0 + CPU_BAND_ROWS)
            a0, a1 = max(0, r0 - 1), min(h, r1 + 1)
            y = self.conv1(tokens[:, a0:a1].permute(0, 3, 1, 2), activation="gelu")
            y = self.conv2(y, activation="gelu")[:, :, r0 - a0 : r1 - a0]
            y = self.conv3(y, residual=tokens[:, r0:r1].permute(0, 3, 1, 2), activation="gelu")
            out[:, r0:r1] = y.permute(0, 2, 3, 1)
        return out.permute(0, 3, 1, 2)


class PatchMerging(nn.Module):
    """1×1 conv, 3×3 depthwise conv with ``stride``, 1×1 conv: ``(B, dim, H, W)`` → ``(B, out_dim, H', W')``."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not plain_inside(self, conv1=Conv2dBN, conv2=Conv2dBN, conv3=Conv2dBN):  # (see PatchEmbed)
            return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return self.conv3(self.conv2(self.conv1(x, activation="gelu"), activation="gelu"))


class Attention(nn.Module):
    """Pre-norm multi-head attention on ``(B, N, C)`` windows of ``N = ws * ws`` tokens, with a
    learned bias per head and per absolute offset ``(|dy|, |dx|)`` between two tokens (LeViT)."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # Offset (a, b) has column a * ws + b of the table: the order in which TinyViT's
        # construction loop first meets the offsets, so checkpoints line up.
        coords = torch.stack(
            torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ).flatten(1)  # (2, N)
        offsets = (coords[:, :, None] - coords[:, None, :]).abs()  # (2, N, N)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", offsets[0] * window_size + offsets[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # TinyViT lays q, k, v out per head: (B, N, heads, [q | k | v]), not (B, N, 3, heads, d).
        qkv = linear_layer(self.norm(x), self.qkv)
        qkv = qkv.view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, heads, N, head_dim) each
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        # The bias expanded over the windows (a view): SDPA then reads it as it is, where an
        # unexpanded (heads, N, N) mask costs more than explicit attention on a CPU.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(b, -1, -1, -1), scale=self.scale)
        return linear_layer(x.transpose(1, 2).reshape(b, n, -1), self.proj)


class Mlp(nn.Module):
    """Pre-norm two-layer GELU MLP (``norm``/``fc1``/``fc2`` keys)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``fc2(gelu(fc1(norm(x))))``, plus ``residual`` (shaped as ``x``) if given."""
        return mlp_in_chunks(x, self.fc1, self.fc2, self.norm, residual)


class TinyViTBlock(nn.Module):
    """Window attention, a depthwise conv between windows, then an MLP, on ``(B, H, W, C)``."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        # The norm sits inside the attention, after the zero padding: padded tokens are keys
        # (normalised zeros), exactly as in TinyViT.
        windows, pad_hw = window_partition(x, ws)
        windows = self.attn(windows.view(-1, ws * ws, c)).view(-1, ws, ws, c)
        x = x + window_unpartition(windows, ws, pad_hw, (h, w))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if not is_plain(self.mlp, Mlp):  # a hook on the MLP sees its own output, as in the reference
            return x + self.mlp(x)
        return self.mlp(x, residual=x)


class ConvLayer(nn.Module):
    """Stage of MBConv blocks, then an optional patch merging, on ``(B, C, H, W)``."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class BasicLayer(nn.Module):
    """Stage of TinyViT blocks, then an optional patch merging, on ``(B, C, H, W)``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1).contiguous()  # blocks work on (B, H, W, C) tokens
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """Image ``(B, in_chans, S, S)`` normalised and padded → embedding ``(B, out_chans, S/16, S/16)``."""

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        n = len(depths)
        self.layers = nn.ModuleList()
        for i in range(n):
            downsample = None
            if i < n - 1:
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride=1 if i == n - 2 else 2)
            if i == 0:
                layer: nn.Module = ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, downsample)
            else:
                layer = BasicLayer(
                    embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size, downsample
                )
            self.layers.append(layer)
        # ImageNet classifier of TinyViT, unused by SAM but kept: MobileSAM checkpoints hold it.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last activations: the depthwise convs run several times faster on the CPU.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def _init_weights(m: nn.Module) -> None:
    """TinyViT's initialisation of the linear layers (truncated normal, zero bias)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _in_bands(block: MBConv, x: torch.Tensor) -> bool:
    """Whether ``block`` takes ``x`` by :meth:`MBConv._forward_in_bands`: in eval mode (training
    batch-normalises the whole map), CPU inference (no autograd, not under ``torch.compile``), on
    a channels-last map whose expanded activations are large."""
    hidden = block.conv1.c.out_channels
    return (not block.training and onednn_products(x) and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[0] * hidden * x.shape[2] * x.shape[3] >= CPU_BANDS_MIN_ELEMENTS)
