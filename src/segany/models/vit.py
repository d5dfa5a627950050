"""SAM's ViT image encoder (ViT-B/L/H): windowed attention with decomposed relative positions.

Attention runs through ``scaled_dot_product_attention`` with the decomposed relative
position terms as an additive bias, except on a CPU, where large grids go a chunk of queries at a
time, and on a GPU in half precision, where the terms ride inside q and k (``GPU_ATTENTION``). The
index tables that gather those terms are computed once per input size and cached, not rebuilt at
every call.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import LayerNorm2d, MLPBlock, Scratch, half_residual_stream, linear_layer, plain_inside
from .windows import window_partition, window_unpartition


# Queries per part of a CPU attention by parts (Attention._attention_in_parts), and the logits a
# part holds at most: ViT-B/L/H's 64×64 global blocks go one head × 512 queries (8 MB in fp32).
CPU_QUERY_CHUNK = 512
CPU_PART_LOGITS = 512 * 4096
# From this many tokens a CPU attention always goes by parts: ViT-B/L/H's 64×64 global blocks,
# whose whole bias would take 805 MB a block.
CPU_PARTS_ALWAYS_TOKENS = 2048
# From this many tokens it does so in fp32 inference too: ViT-B/L/H's 14×14 windows (a ViT-B encoder
# 1.7 % faster than by SDPA with the bias, 2-core AVX2 EPYC); the default model's 8×8 windows are
# faster by SDPA (41 against 46 ms an encoder), its 32×32 global blocks the same either way.
CPU_PARTS_MIN_TOKENS = 128
# On a GPU in half precision, by kind of block ("window" or "global"): how the relative-position
# terms reach the attention, and the SDPA kernel tried first (None: PyTorch's own order).
# "augmented": inside q and k (see Attention._attention_augmented), so SDPA can take its flash
# kernel instead of reading an H*W × H*W bias per head; "bias": the additive bias; "fused": added
# inside a Triton kernel (relpos_attention; not measured on a GPU yet). Benchmarks switch these.
GPU_ATTENTION: dict[str, tuple[str, SDPBackend | None]] = {"window": ("augmented", None), "global": ("augmented", None)}
_FLASH_MAX_HEAD_DIM = 256  # flash kernels take head dimensions up to this


class ImageEncoderViT(nn.Module):
    """Image ``(B, 3, S, S)`` normalised and padded → embedding ``(B, out_chans, S/16, S/16)``."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, H, W, C)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != x.shape[1:3]:  # another working image size than trained for
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                    align_corners=False).permute(0, 2, 3, 1)
            x = x + pos
        # With hooks or stand-ins inside, the blocks see the reference's fp32 stream and make fresh outputs.
        scratch = None
        if plain_inside(self):
            x = half_residual_stream(x)
            scratch = Scratch.wanted(x)
        for blk in self.blocks:
            x = blk(x) if scratch is None else blk(x, scratch)  # (a hook sees the reference's arguments)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` → ``(B, H/p, W/p, embed_dim)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size == 0`` means global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        use_rel_pos: bool,
        window_size: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            kind="global" if window_size == 0 else "window",
        )
        self.norm2 = norm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """``(B, H, W, C)`` → ``(B, H, W, C)``; ``scratch``: buffers shared by the blocks of one pass."""
        if not plain_inside(self, attn=Attention, mlp=MLPBlock):  # hooks or stand-ins: modules called one by one
            y = self.norm1(x)
            if self.window_size == 0:
                y = self.attn(y)
            else:
                windows, pad_hw = window_partition(y, self.window_size)
                y = window_unpartition(self.attn(windows), self.window_size, pad_hw, y.shape[1:3])
            x = x + y
            return x + self.mlp(self.norm2(x))
        y = self.norm1(x)
        if self.window_size == 0:
            y = self.attn.attend(y, scratch)
        elif _project_before_partition(y):
            # The projection is per token, so on a CPU, where the products bound the time, it runs
            # before partitioning, on the real tokens only: the padding tokens (zeros after norm1 in
            # the reference) project to the bias. ViT-B's 14×14 windows: 4096 instead of 4900 rows,
            # 82 against 96 ms a block. (On an H200 it was slower: ViT-H 20.6 against 20.0 ms an
            # image in bf16, 17.0 against 16.75 compiled.)
            h, w = y.shape[1], y.shape[2]
            qkv = self.attn.project_qkv(y, scratch)
            windows, pad_hw = window_partition(qkv, self.window_size, pad=self.attn.qkv.bias, scratch=scratch)
            y = window_unpartition(self.attn.attend_qkv(windows, scratch), self.window_size, pad_hw, (h, w))
        else:
            h, w = y.shape[1], y.shape[2]
            windows, pad_hw = window_partition(y, self.window_size)
            y = window_unpartition(self.attn.attend(windows), self.window_size, pad_hw, (h, w))
        # The output projection is per token: it runs after unpartitioning (no padding tokens), and
        # the shortcuts are added as the products are written.
        x = linear_layer(y, self.attn.proj, residual=x, residual_owned=scratch is not None)
        return self.mlp(self.norm2(x), residual=x, scratch=scratch)


class Attention(nn.Module):
    """Multi-head attention on ``(B, H, W, C)`` tokens with decomposed relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
        kind: str = "global",
    ) -> None:
        super().__init__()
        self.kind = kind  # "window" or "global": picks the GPU_ATTENTION policy (see attend_qkv)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is needed for relative position embeddings")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_layer(self.attend(x), self.proj)

    def attend(self, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """``(B, H, W, C)`` tokens → the heads' outputs ``(B, H, W, C)``, before the output projection."""
        return self.attend_qkv(self.project_qkv(x, scratch), scratch)

    def project_qkv(self, x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """``(B, H, W, C)`` tokens → their queries, keys and values ``(B, H, W, 3C)``."""
        out = None if scratch is None else scratch.take_output("qkv", x, self.qkv.out_features)
        return linear_layer(x, self.qkv, out=out)

    def attend_qkv(self, qkv: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """Queries, keys and values ``(B, H, W, 3C)`` → the heads' outputs ``(B, H, W, C)``."""
        b, h, w, _ = qkv.shape
        # (3, B, heads, H*W, head_dim)
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos and _by_parts(q, h, w):
            return self._attention_in_parts(q, k, v, h, w, scratch)
        # (getattr: an Attention pickled whole before ``kind`` existed takes the global policy)
        cpu_mode = "augmented" if torch.compiler.is_exporting() else "bias"  # exported: no H*W × H*W bias tensor
        mode, first = GPU_ATTENTION[getattr(self, "kind", "global")] if _gpu_half(q) else (cpu_mode, None)
        if mode == "fused" and torch.is_grad_enabled():
            mode = "augmented"  # the fused kernel is forward only
        if self.use_rel_pos and mode == "fused":
            from .relpos_attention import relpos_attention  # imports Triton: only for this policy

            rel_h, rel_w = self._rel_pos_terms(q, h, w)
            return relpos_attention(q, k, v, rel_h, rel_w, self.scale).view(b, h, w, -1)
        with _kernels_first(first):
            if self.use_rel_pos and mode == "augmented" and _flash_takes(q, h, w):
                x = self._attention_augmented(q, k, v, h, w)
            else:
                bias = self._rel_pos_bias(q, h, w) if self.use_rel_pos else None
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)

    def _rel_pos_terms(self, q: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decomposed relative-position terms (MViTv2) of queries ``(B, heads, H*W, d)``:
        ``(B, heads, H*W, H)`` by key row and ``(B, heads, H*W, W)`` by key column."""
        rh = self._rel_table(self.rel_pos_h, h)  # (H, H, head_dim)
        rw = self._rel_table(self.rel_pos_w, w)  # (W, W, head_dim)
        b, n_heads, _, dim = q.shape
        r_q = q.reshape(b, n_heads, h, w, dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).reshape(b, n_heads, h * w, h)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).reshape(b, n_heads, h * w, w)
        return rel_h, rel_w

    def _rel_pos_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Decomposed relative-position bias ``(B, heads, H*W, H*W)``."""
        rel_h, rel_w = self._rel_pos_terms(q, h, w)
        if q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu":
            # A broadcast add of half-precision tables runs element by element on a CPU (~4x the
            # fp32 time); the same sums as a product with each key's one-hot row and column are
            # one vectorised matmul, and exact (two non-zero terms, rounded once, as the add).
            return torch.cat([rel_h, rel_w], -1) @ self._key_onehot(h, w, 0, q).t()
        b, n_heads, n, _ = rel_h.shape
        # Contiguous terms make the broadcast sum contiguous, so the final reshape is a view:
        # for a 64×64 global block the bias is 805 MB at ViT-B, and a copy of it costs as much as the add.
        bias = rel_h.contiguous()[..., :, None] + rel_w.contiguous()[..., None, :]  # (B, heads, H*W, H, W)
        return bias.view(b, n_heads, n, n)

    def _attention_in_parts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int,
                            scratch: Scratch | None = None) -> torch.Tensor:
        """Attention with the relative-position terms for ``(B, heads, H*W, d)`` q, k, v → the
        heads' outputs ``(B, H, W, heads * d)``, a few heads and a chunk of queries at a time
        (ViT-B's global blocks: one head × 512 queries; its 14×14 windows: the 12 heads of one
        window). The part's logits stay in cache while the terms are added and the softmax runs,
        instead of a whole ``H*W × H*W`` bias per head going through memory (805 MB per global
        block of ViT-B, 46 MB per window block). Same values as the SDPA path.

        Without autograd, one logits buffer serves every part: the two terms are summed into it in
        one pass, the product with the keys, scaled as it is made, accumulates onto them
        (``baddbmm_(alpha=scale)``: no scaled copy of q), the softmax runs
        in place, and the product with the values is written straight into the output's
        token-major layout. 2-core AVX2 EPYC, fp32: a ViT-B global block's attention 0.50 s against
        0.58 s with separate adds, a fresh product per chunk and a final transpose; a window
        block's 41 against 55 ms by SDPA with the whole bias (medians)."""
        rel_h, rel_w = self._rel_pos_terms(q, h, w)
        b, n_heads, n, d = q.shape
        out = q.new_empty(b, n, n_heads, d)
        chunk = min(n, CPU_QUERY_CHUNK)
        group = max(1, min(n_heads, CPU_PART_LOGITS // (chunk * n)))  # heads a part
        grad = torch.is_grad_enabled()
        size = group * chunk * n
        buffer = None if grad else q.new_empty(size) if scratch is None else scratch.take("logits", size, q)
        for i in range(b):
            for j in range(0, n_heads, group):
                hs = slice(j, min(n_heads, j + group))
                keys_t, values = k[i, hs].transpose(1, 2), v[i, hs]  # (g, d, H*W), (g, H*W, d)
                for s in range(0, n, chunk):
                    e = min(n, s + chunk)
                    terms_h, terms_w = rel_h[i, hs, s:e, :, None], rel_w[i, hs, s:e, None, :]  # (g, c, H, 1), (g, c, 1, W)
                    target = out[i, s:e, hs].transpose(0, 1)  # (g, c, d) view of the output
                    if grad:
                        logits = (q[i, hs, s:e] @ keys_t * self.scale).unflatten(-1, (h, w)) + terms_h + terms_w
                        target.copy_(torch.softmax(logits.flatten(-2), dim=-1) @ values)
                        continue
                    logits = buffer[: (hs.stop - hs.start) * (e - s) * n].view(-1, e - s, n)
                    torch.add(terms_h, terms_w, out=logits.unflatten(-1, (h, w)))
                    logits.baddbmm_(q[i, hs, s:e], keys_t, alpha=self.scale)
                    torch.softmax(logits, dim=-1, out=logits)
                    torch.bmm(logits, values, out=target)
        return out.view(b, h, w, n_heads * d)

    def _attention_augmented(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int
                             ) -> torch.Tensor:
        """The same attention as the bias path, with the relative-position terms folded into the
        product: ``[q·scale, rel_h, rel_w] · [k, onehot(key row), onehot(key column)]`` equals
        ``q·k·scale + rel_h[key row] + rel_w[key column]``, so no ``H*W × H*W`` bias is built and
        SDPA may use its flash kernel (which takes no bias). ``v`` is zero-padded to the same
        head dimension (flash needs equal ones); the padding's outputs are dropped."""
        rel_h, rel_w = self._rel_pos_terms(q, h, w)
        b, n_heads, n, d = q.shape
        extra = (-(d + h + w)) % 8  # flash wants head dimensions in multiples of 8
        q_aug = torch.cat([q * self.scale, rel_h, rel_w, q.new_zeros(b, n_heads, n, extra)], dim=-1)
        k_aug = torch.cat([k, self._key_onehot(h, w, extra, k).expand(b, n_heads, n, -1)], dim=-1)
        v_aug = F.pad(v, (0, h + w + extra))
        return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., :d]

    def _key_onehot(self, h: int, w: int, extra: int, like: torch.Tensor) -> torch.Tensor:
        """``(H*W, H + W + extra)``: each key's row and column as one-hot vectors (cached)."""

        def build() -> torch.Tensor:
            n = torch.arange(h * w, device=like.device)
            onehot = torch.zeros(h * w, h + w + extra, dtype=like.dtype, device=like.device)
            onehot[n, n // w] = 1
            onehot[n, h + n % w] = 1
            return onehot

        return self._cached((h, w, extra, str(like.device), like.dtype), build)

    def _rel_table(self, rel_pos: torch.Tensor, size: int) -> torch.Tensor:
        """Gather the ``(size, size, head_dim)`` table of relative embeddings."""
        max_rel_dist = 2 * size - 1
        if rel_pos.shape[0] != max_rel_dist:  # working size differs from the trained one
            rel_pos = F.interpolate(
                rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
            ).reshape(-1, max_rel_dist).permute(1, 0)

        def build() -> torch.Tensor:
            coords = torch.arange(size, device=rel_pos.device)
            return coords[:, None] - coords[None, :] + (size - 1)

        return rel_pos[self._cached((size, str(rel_pos.device)), build)]

    def _cached(self, key: tuple, build) -> torch.Tensor:
        """The index table ``build()`` makes, made once per key. It is made outside inference mode:
        a table made during an inference-mode call would be an inference tensor, and a later
        training pass through the same model could not save it for backward. Under torch.compile
        a missing table is built in the graph instead (the compiler keeps no Python state)."""
        table = self._index_cache.get(key)
        if table is None:
            if torch.compiler.is_compiling():
                return build()
            with torch.inference_mode(False):
                table = build()
            self._index_cache[key] = table
        return table


def _by_parts(q: torch.Tensor, h: int, w: int) -> bool:
    """Whether a CPU attention over an ``h × w`` grid goes by :meth:`Attention._attention_in_parts`."""
    if q.device.type != "cpu" or torch.compiler.is_exporting():  # an export would unroll the loop over parts
        return False
    # Under torch.compile windows stay on SDPA: the compiler would unroll the loop over parts.
    return h * w >= CPU_PARTS_ALWAYS_TOKENS or (
        h * w >= CPU_PARTS_MIN_TOKENS and q.dtype == torch.float32 and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling())


def _project_before_partition(x: torch.Tensor) -> bool:
    """Whether a window block projects q, k, v before partitioning (see :meth:`Block.forward`)."""
    return x.device.type == "cpu"


def _gpu_half(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def _flash_takes(q: torch.Tensor, h: int, w: int) -> bool:
    """Whether flash kernels take the head dimension of :meth:`Attention._attention_augmented`."""
    return (q.shape[-1] + h + w + 7) // 8 * 8 <= _FLASH_MAX_HEAD_DIM


def _kernels_first(backend: SDPBackend | None):
    """A context in which SDPA tries ``backend`` first, then the other kernels, or a no-op for None
    (the default: PyTorch's own choice). For benchmark A/B runs; ``set_priority`` needs torch ≥ 2.6."""
    if backend is None:
        return contextlib.nullcontext()
    rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH) if b != backend]
    return sdpa_kernel([backend, *rest], set_priority=True)
