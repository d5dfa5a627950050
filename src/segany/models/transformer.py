"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a final token-to-image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``(B, C, h, w)`` and its PE (same shape), tokens ``(B, N, C)``
        → tokens ``(B, N, C)`` and image tokens ``(B, h*w, C)``."""
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image.few_to_many(q=queries + point_embedding, k=keys + key_pe, v=keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token→image attention, token MLP, image→token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image.few_to_many(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token.many_to_few(q=k, k=q, v=queries))
        return queries, keys


class Attention(nn.Module):
    """Attention whose internal width is ``embedding_dim / downsample_rate``.

    Between a handful of prompt tokens (Nt ≈ 2–10) and the 4096 image tokens, projecting the image
    side costs most of the decoder. :meth:`few_to_many` and :meth:`many_to_few` give the same
    result as :meth:`forward` with the projections folded into the small side instead (plain
    re-association of the matrix products), so the image side is never projected: about
    ``heads · Nt`` instead of ``2 · internal_dim`` multiply-adds per image token and channel.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    def _head_weights(self, linear: nn.Linear) -> torch.Tensor:
        """``(heads, head_dim, embedding_dim)`` view of a projection's weight."""
        return linear.weight.view(self.num_heads, -1, linear.weight.shape[1])

    def few_to_many(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries ``(B, Nt, C)`` attend to many keys/values ``(B, Ni, C)`` → ``(B, Nt, C)``."""
        b, nt, _ = q.shape
        qh = self._heads(self.q_proj(q))  # (B, h, Nt, d)
        scale = qh.shape[-1] ** -0.5
        # q·(W_k x + b_k) = (W_k^T q)·x + q·b_k; the last term is the same for every key, and
        # softmax over the keys ignores it.
        qk = torch.einsum("bhnd,hdc->bhnc", qh * scale, self._head_weights(self.k_proj))
        # Heads and tokens share one matrix product with the image side (no per-head copy of it).
        attn = torch.softmax(qk.reshape(b, -1, qk.shape[-1]) @ k.transpose(1, 2), dim=-1)  # (B, h*Nt, Ni)
        pooled = (attn @ v).view(b, self.num_heads, nt, -1)  # (B, h, Nt, C); the weights sum to one,
        out = torch.einsum("bhnc,hdc->bnhd", pooled, self._head_weights(self.v_proj))  # so b_v passes as is
        out = out.reshape(b, nt, self.internal_dim) + self.v_proj.bias
        return self.out_proj(out)

    def many_to_few(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Many queries ``(B, Ni, C)`` attend to few keys/values ``(B, Nt, C)`` → ``(B, Ni, C)``."""
        b, nt, _ = k.shape
        ni, heads = q.shape[1], self.num_heads
        kh = self._heads(self.k_proj(k))  # (B, h, Nt, d)
        kh = kh * kh.shape[-1] ** -0.5
        vh = self._heads(self.v_proj(v))
        # (W_q x + b_q)·k = x·(W_q^T k) + b_q·k
        wk = torch.einsum("bhnd,hdc->bhnc", kh, self._head_weights(self.q_proj)).reshape(b, heads * nt, -1)
        const = torch.einsum("bhnd,hd->bhn", kh, self.q_proj.bias.view(heads, -1))  # (B, h, Nt)
        # Logits as (B, h, Nt, Ni): the softmax over the few keys then runs along the contiguous
        # image axis; a softmax over a last axis of ~7 elements is several times slower.
        logits = (wk @ q.transpose(1, 2)).view(b, heads, nt, ni) + const.unsqueeze(-1)
        e = (logits - logits.amax(2, keepdim=True)).exp_()
        attn = (e / e.sum(2, keepdim=True)).view(b, heads * nt, ni)
        # out_proj(concat_h attn_h v_h) = Σ_h attn_h (v_h W_o,h^T) + b_o
        w_out = self.out_proj.weight.view(-1, heads, vh.shape[-1])  # (C, h, d)
        vo = torch.einsum("bhnd,chd->bhnc", vh, w_out).reshape(b, heads * nt, -1)  # (B, h*Nt, C)
        return attn.transpose(1, 2) @ vo + self.out_proj.bias
