"""Attention with SAM's decomposed relative positions added inside the kernel (GPU, Triton).

``softmax(q·kᵀ·scale + rel_h[query, key row] + rel_w[query, key column]) · v`` for
``(B, heads, H*W, d)`` q, k, v and the terms ``rel_h (B, heads, H*W, H)``, ``rel_w (B, heads, H*W, W)``
(``Attention._rel_pos_terms``), one flash-style pass: no ``H*W × H*W`` bias in memory, and the head
dimension padded only to the next power of two (ViT-H: 80 → 128), where the augmented-q/k path
(``Attention._attention_augmented``) runs SDPA at 80 + 64 + 64 = 208. The kernel gathers each key's
row and column terms as it goes. The approach is the one segment-anything-fast took on an A100.

An A/B policy of ``vit.GPU_ATTENTION`` ("fused"), not the default: it is tested on the CPU through
Triton's interpreter only, and waits for a GPU measurement (``benchmarks/bench_gpu.py --ab``).
Forward only: with autograd on, the callers keep SDPA.
"""

from __future__ import annotations

import torch

import triton  # comes with PyTorch's CUDA builds on Linux; imported only for the "fused" policy
import triton.language as tl


# Queries and keys a program takes at a time (untuned: FlashAttention-2's usual shape on Hopper).
BLOCK_M = 128
BLOCK_N = 64


def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                     rel_w: torch.Tensor, scale: float, block_m: int | None = None, block_n: int | None = None
                     ) -> torch.Tensor:
    """``(B, heads, N, d)`` q, k, v (any strides) with terms ``(B, heads, N, H)`` and ``(B, heads, N, W)``,
    ``N = H * W``, key ``j`` at row ``j // W``, column ``j % W`` → the heads' outputs written
    token-major, ``(B, N, heads, d)``, in q's dtype. On a GPU, fp16 or bf16 only."""
    b, n_heads, n, d = q.shape
    grid_h, grid_w = rel_h.shape[-1], rel_w.shape[-1]
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if rel_h.shape != (b, n_heads, n, grid_h) or rel_w.shape != (b, n_heads, n, grid_w) or grid_h * grid_w != n:
        raise ValueError(f"relative terms {tuple(rel_h.shape)} and {tuple(rel_w.shape)} do not fit {n} tokens "
                         f"of {tuple(q.shape)}")
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        # fp32 products would take TF32 and more shared memory than a Hopper SM has at these blocks.
        raise ValueError(f"the fused attention takes fp16 or bf16 on a GPU, got {q.dtype}")
    return _relpos_attention_op(q, k, v, rel_h, rel_w, scale, block_m or BLOCK_M, block_n or BLOCK_N)


# A custom op, so that torch.compile keeps the kernel as one opaque call in its graph (the shapes
# from the fake below) instead of tracing into Triton.
@torch.library.custom_op("segany::relpos_attention", mutates_args=())
def _relpos_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                         rel_w: torch.Tensor, scale: float, block_m: int, block_n: int) -> torch.Tensor:
    b, n_heads, n, d = q.shape
    grid_w = rel_w.shape[-1]
    out = q.new_empty(b, n, n_heads, d)
    # Heads on the first grid axis (2^31 - 1 programs), query blocks on the second (65535).
    grid = (b * n_heads, triton.cdiv(n, block_m))
    _relpos_attention_kernel[grid](
        q, k, v, rel_h, rel_w, out,
        *q.stride(), *k.stride(), *v.stride(), *rel_h.stride(), *rel_w.stride(),
        out.stride(0), out.stride(2), out.stride(1), out.stride(3),
        n_heads, n, d, grid_w, scale * _LOG2E, _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        ROW_TILES=grid_w % block_n == 0,
        num_warps=8 if block_m >= 128 else 4, num_stages=3,
    )
    return out


@_relpos_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float,
      block_m: int, block_n: int) -> torch.Tensor:
    b, n_heads, n, d = q.shape
    return q.new_empty(b, n, n_heads, d)


_LOG2E = 1.4426950408889634


@triton.jit
def _relpos_attention_kernel(
    Q, K, V, RH, RW, O,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    srb, srh, srn, srk, swb, swh, swn, swk, sob, soh, son, sod,
    NH, N, D, GW, qk_scale, log2e,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROW_TILES: tl.constexpr,
):
    """One program: ``BLOCK_M`` queries of one (image, head), over all keys ``BLOCK_N`` at a
    time, with the online softmax in base 2 and fp32 (running max ``m``, sum ``l``). ``ROW_TILES``:
    each key tile lies in one key row (``GW`` a multiple of ``BLOCK_N``, as in 64×64 global grids),
    so its row term is one value per query and its column terms a contiguous run; otherwise
    both are gathered key by key."""
    pid_z = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_z // NH).to(tl.int64)  # 64-bit: image offsets pass 2^31 elements at large batches
    h = (pid_z % NH).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rh_rows = RH + b * srb + h * srh + offs_m[:, None] * srn
    rw_rows = RW + b * swb + h * swh + offs_m[:, None] * swn
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        both = m_ok[:, None] & n_ok[None, :]
        if ROW_TILES:
            cols = start % GW + tl.arange(0, BLOCK_N)
            rel = tl.load(rh_rows + (start // GW) * srk, mask=m_ok[:, None], other=0.0).to(tl.float32)
            rel += tl.load(rw_rows + cols[None, :] * swk, mask=both, other=0.0).to(tl.float32)
        else:
            rel = tl.load(rh_rows + (offs_n // GW)[None, :] * srk, mask=both, other=0.0).to(tl.float32)
            rel += tl.load(rw_rows + (offs_n % GW)[None, :] * swk, mask=both, other=0.0).to(tl.float32)
        s = tl.dot(q, kt) * qk_scale + rel * log2e
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None])
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
