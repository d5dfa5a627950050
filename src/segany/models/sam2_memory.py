"""SAM 2's video memory modules: memory attention and the memory encoder.

Single images never run these (the image predictor adds ``no_mem_embed`` instead); they are built
to the reference shapes so that Meta's checkpoints load strictly and their weights are kept for
video tracking. State-dict keys and numerics are those of Meta's
``sam2.modeling.memory_attention`` and ``sam2.modeling.memory_encoder``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm2d
from .sam2_neck import PositionEmbeddingSine


# -- rotary position encoding (axial, 2-D) ------------------------------------------------------
def compute_axial_cis(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex rotations ``(end_x * end_y, dim / 2)`` for a row-major ``end_y × end_x`` grid."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32)
    t_x, t_y = (t % end_x).float(), torch.div(t, end_x, rounding_mode="floor").float()
    fx, fy = torch.outer(t_x, freqs), torch.outer(t_y, freqs)
    return torch.cat([torch.polar(torch.ones_like(fx), fx), torch.polar(torch.ones_like(fy), fy)], dim=-1)


def apply_rotary_enc(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor,
                     repeat_freqs_k: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries ``(B, heads, Nq, c)`` and keys ``(B, heads, Nk, c)``; with ``repeat_freqs_k``
    the keys are ``Nk / Nq`` stacked frames of the query grid."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)
    if xk.shape[-2] == 0:  # no keys to rotate
        return xq_out, xk
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    if repeat_freqs_k:
        r = xk_.shape[-2] // xq_.shape[-2]
        freqs_cis = freqs_cis.repeat(r, 1)
    return xq_out, torch.view_as_real(xk_ * freqs_cis).flatten(3).type_as(xk)


class RoPEAttention(nn.Module):
    """Multi-head attention with axial rotary encoding of the image tokens; keys and values may
    come from a narrower input (``kv_in_dim``, the memory width)."""

    def __init__(self, embedding_dim: int = 256, num_heads: int = 1, kv_in_dim: int | None = None,
                 rope_theta: float = 10000.0, rope_k_repeat: bool = False,
                 feat_sizes: tuple[int, int] = (64, 64), dropout: float = 0.1) -> None:
        super().__init__()
        kv_in_dim = kv_in_dim or embedding_dim
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self.dropout_p = dropout
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self.head_dim = embedding_dim // num_heads
        self._freqs: dict[tuple, torch.Tensor] = {}  # per (grid side, device); not in the state dict

    def _freqs_cis(self, n: int, device: torch.device) -> torch.Tensor:
        side = int(math.isqrt(n))  # the query tokens are a square grid
        key = (side, str(device))
        if key not in self._freqs:
            self._freqs[key] = compute_axial_cis(self.head_dim, side, side, self.rope_theta).to(device)
        return self._freqs[key]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """``q (B, Nq, C)``, ``k``/``v (B, Nk, kv_in_dim)`` → ``(B, Nq, C)``; the last
        ``num_k_exclude_rope`` keys (object pointers) are not rotated."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        if q.shape[-2] != k.shape[-2] and not self.rope_k_repeat:
            raise ValueError("queries and keys differ in length; this attention needs rope_k_repeat")
        n_rope = k.shape[-2] - num_k_exclude_rope
        q, k_rope = apply_rotary_enc(q, k[:, :, :n_rope], self._freqs_cis(q.shape[-2], q.device), self.rope_k_repeat)
        k = torch.cat([k_rope, k[:, :, n_rope:]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MemoryAttentionLayer(nn.Module):
    """Self-attention on the current frame, cross-attention to memories, feed-forward (pre-norm)."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 2048, mem_dim: int = 64,
                 dropout: float = 0.1, feat_sizes: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.self_attn = RoPEAttention(d_model, 1, feat_sizes=feat_sizes, dropout=dropout)
        self.cross_attn_image = RoPEAttention(d_model, 1, kv_in_dim=mem_dim, rope_k_repeat=True,
                                              feat_sizes=feat_sizes, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor | None = None,
                query_pos: torch.Tensor | None = None, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """``tgt (B, N, d_model)``, ``memory``/``pos (B, M, mem_dim)`` → ``(B, N, d_model)``.

        The official configs add positions only to the cross-attention keys (RoPE does the rest).
        """
        x = self.norm1(tgt)
        tgt = tgt + self.dropout(self.self_attn(x, x, v=x))
        x = self.norm2(tgt)
        keys = memory + pos if pos is not None else memory
        tgt = tgt + self.dropout(self.cross_attn_image(x, keys, memory, num_k_exclude_rope=num_k_exclude_rope))
        x = self.norm3(tgt)
        return tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))


class MemoryAttention(nn.Module):
    """Conditions the current frame's features on memories of past frames and object pointers."""

    def __init__(self, d_model: int = 256, num_layers: int = 4, mem_dim: int = 64, dim_feedforward: int = 2048,
                 feat_sizes: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, dim_feedforward, mem_dim, feat_sizes=feat_sizes) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, curr: torch.Tensor, memory: torch.Tensor, curr_pos: torch.Tensor,
                memory_pos: torch.Tensor, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        """Sequence-first as in the reference: ``curr``/``curr_pos (N, B, d_model)``,
        ``memory``/``memory_pos (M, B, mem_dim)`` whose last ``num_obj_ptr_tokens`` entries are
        object pointers → ``(N, B, d_model)``."""
        output = (curr + 0.1 * curr_pos).transpose(0, 1)
        curr_pos, memory, memory_pos = curr_pos.transpose(0, 1), memory.transpose(0, 1), memory_pos.transpose(0, 1)
        for layer in self.layers:
            output = layer(output, memory, pos=memory_pos, query_pos=curr_pos, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.norm(output).transpose(0, 1)


# -- memory encoder -----------------------------------------------------------------------------
class MaskDownSampler(nn.Module):
    """Mask ``(B, 1, H, W)`` → ``(B, embed_dim, H/16, W/16)``: four stride-2 convolutions
    (channels ×4 each), each with LayerNorm2d and GELU, then a 1×1 projection."""

    def __init__(self, embed_dim: int = 256, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 total_stride: int = 16) -> None:
        super().__init__()
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        self.encoder = nn.Sequential()
        c_in = 1
        for _ in range(num_layers):
            c_out = c_in * stride**2
            self.encoder.append(nn.Conv2d(c_in, c_out, kernel_size, stride, padding))
            self.encoder.append(LayerNorm2d(c_out))
            self.encoder.append(nn.GELU())
            c_in = c_out
        self.encoder.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block on ``(B, C, H, W)``: depthwise 7×7 conv, LayerNorm, MLP ×4, layer scale, residual."""

    def __init__(self, dim: int = 256, kernel_size: int = 7, padding: int = 3) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A stack of :class:`CXBlock` (``layers.i`` keys)."""

    def __init__(self, dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """A frame's features and predicted mask → a memory ``(B, out_dim, h, w)`` and its position encoding."""

    def __init__(self, out_dim: int = 64, in_dim: int = 256) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim, 2)
        self.position_encoding = PositionEmbeddingSine(out_dim)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
                ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """``pix_feat (B, in_dim, h, w)``, mask logits ``(B, 1, 16h, 16w)`` → ``vision_features``
        ``(B, out_dim, h, w)`` and ``vision_pos_enc`` (a one-element list, as the reference)."""
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        return {"vision_features": x, "vision_pos_enc": [self.position_encoding(x).to(x.dtype)]}
