"""The fused relative-position attention kernel (``models/relpos_attention.py``, a GPU A/B policy),
run on the CPU through Triton's interpreter, in a subprocess (the interpreter is chosen when Triton
is first imported). Triton's interpreter computes bf16 products wrongly here, so half precision
is checked in fp16, the same code with another 16-bit type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton comes with PyTorch's CUDA builds; this install has none")

ROOT = Path(__file__).resolve().parents[1]

KERNEL_CHECK = r"""
import torch
from segany.models.relpos_attention import relpos_attention

def explicit(q, k, v, rel_h, rel_w, scale):
    b, heads, n, _ = q.shape
    logits = (q @ k.transpose(-1, -2) * scale).view(b, heads, n, rel_h.shape[-1], rel_w.shape[-1])
    logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
    return (torch.softmax(logits.view(b, heads, n, n), -1) @ v).transpose(1, 2)

torch.manual_seed(0)
# (grid rows, columns, head dim, block_m, block_n): a square grid, tokens not a multiple of the
# blocks (7x7), a non-square grid with a head dim padded to a power of two.
# Key tiles within one key row (columns a multiple of block_n: 4x32) or gathered key by key; the
# default blocks (None) on a grid smaller than them; transposed (non-contiguous) terms.
cases = [(8, 8, 80, 32, 16), (7, 7, 64, 16, 16), (6, 10, 24, 16, 32), (4, 32, 40, 16, 16), (3, 5, 16, None, None)]
for rows, cols, d, bm, bn in cases:
    n = rows * cols
    q, k, v = torch.randn(2, n, 3, 3, d).permute(2, 0, 3, 1, 4).unbind(0)  # strided, as the model's
    rel_h = torch.randn(2, 3, rows, n).transpose(-1, -2)
    rel_w = torch.randn(2, 3, n, cols) * 30  # large terms: the running max must carry them
    ref = explicit(*(t.double() for t in (q, k, v, rel_h, rel_w)), d ** -0.5).float()
    out = relpos_attention(q, k, v, rel_h, rel_w, d ** -0.5, block_m=bm, block_n=bn)
    # fp32 rounding of logits up to ~100: errors ~1e-5 (PyTorch's own fp32 softmax alike)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4, (rows, cols, d)
    half = relpos_attention(*(t.half() for t in (q, k, v, rel_h, rel_w)), d ** -0.5, block_m=bm, block_n=bn)
    assert half.dtype == torch.float16 and ((half.float() - ref).norm() / ref.norm()) <= 2e-3, (rows, cols, d)
print("ok")
"""

ENCODER_CHECK = r"""
import sys
import torch
sys.path.insert(0, "tests")
from conftest import SMALL_VIT, random_sam
from segany.checkpoints import config_with
from segany.models import vit, relpos_attention

relpos_attention.BLOCK_M, relpos_attention.BLOCK_N = 32, 16  # small blocks: the interpreter is slow
# Heads of 24 channels (padded to 32 in the kernel); 16×16 tokens: 7×7 windows padded to 21×21.
encoder = random_sam(config_with(SMALL_VIT, embed_dim=96)).image_encoder.eval()
x = torch.randn(1, 3, 256, 256)
with torch.no_grad():
    ref = encoder(x)
    vit._gpu_half = lambda q: True  # take the GPU's half-precision policy here, in fp32,
    vit._by_parts = lambda q, h, w: False  # and not the CPU's attention by parts
    vit.GPU_ATTENTION.update({"window": ("fused", None), "global": ("fused", None)})
    calls = []
    fused = relpos_attention.relpos_attention
    relpos_attention.relpos_attention = lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    out = encoder(x)
assert len(calls) == len(encoder.blocks), calls  # every block, windows (padded 7x7) and global
assert (out - ref).abs().max() <= 1e-4, (out - ref).abs().max()
print("ok")
"""

COMPILE_CHECK = r"""
import sys
import torch
sys.path.insert(0, "tests")
from conftest import SMALL_VIT, random_sam
from segany.models import vit, relpos_attention

relpos_attention.BLOCK_M, relpos_attention.BLOCK_N = 32, 16
encoder = random_sam(SMALL_VIT).image_encoder.eval()
x = torch.randn(1, 3, 256, 256)
with torch.no_grad():
    ref = encoder(x)
    vit._gpu_half = lambda q: True
    vit._by_parts = lambda q, h, w: False
    vit.GPU_ATTENTION.update({"window": ("fused", None), "global": ("fused", None)})
    # The kernel is one opaque op in one graph: the compiler does not trace into Triton.
    explained = torch._dynamo.explain(encoder)(x)
    assert explained.graph_count == 1 and not explained.break_reasons, explained.break_reasons
    ops = [n for g in explained.graphs for n in g.graph.nodes if "segany.relpos_attention" in str(n.target)]
    assert len(ops) == len(encoder.blocks), ops
    torch._dynamo.reset()
    out = torch.compile(encoder, backend="aot_eager")(x)
assert (out - ref).abs().max() <= 1e-4, (out - ref).abs().max()
print("ok")
"""


@pytest.mark.parametrize("script", [KERNEL_CHECK, ENCODER_CHECK, COMPILE_CHECK], ids=["kernel", "vit-encoder", "compiled"])
def test_fused_relpos_attention_equals_the_explicit_one(script):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
