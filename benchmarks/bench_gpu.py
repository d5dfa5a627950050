"""GPU image encoders: segany vs Meta's ``segment_anything``, same random weights, same batch, one run.

Per model (ViT-B, ViT-H by default), batch 8 of 1024×1024 inputs, medians of CUDA-event timings
after warm-up, in ms per image:

  meta autocast      Meta's encoder, fp32 weights under bf16 autocast (what its code does with AMP)
  ours autocast      segany's encoder the same way (``half=True`` today)
  ours bf16          segany's encoder with bf16 weights and inputs
  ours bf16 bias-attention  the same with the relative positions as an additive SDPA bias
                     (the path before the folded q/k one; for comparison)
  ours bf16 compile  the same through ``torch.compile`` (``--compile``; compile time reported)

plus each variant's relative error against segany's fp32 embedding (‖a − b‖ / ‖b‖) and peak
GPU memory. Usage (needs a CUDA GPU and ``segment_anything``):

    python benchmarks/bench_gpu.py [--models sam_b sam_h] [--batch 8] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


def median_ms(fn, repeat: int, device: str, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def bench_model(name: str, batch: int, repeat: int, compile_: bool, device: str,
                compile_only: bool = False) -> list[dict]:
    from conftest import SMALL_VIT, meta_twin, random_sam

    from segany.models import MODELS, vit

    cfg = SMALL_VIT if name == "small" else MODELS[name]
    ours = random_sam(cfg, seed=0).eval()
    meta = meta_twin(ours, cfg).eval()
    enc = ours.image_encoder.to(device)
    meta_enc = meta.image_encoder.to(device)
    size = ours.img_size
    del ours, meta
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn((batch, 3, size, size), generator=g, device=device)
    cuda = device == "cuda"
    rows = []
    with torch.inference_mode():
        ref = enc(x)

        def variant(label: str, fn, setup_s: float = 0.0) -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out = fn()
            ms = median_ms(fn, repeat, device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            rows.append(dict(model=name, variant=label, ms_per_image=ms / batch, batch=batch,
                             rel_err_vs_fp32=rel_err(out, ref), peak_gpu_mib=peak, setup_s=round(setup_s, 1)))
            print(json.dumps(rows[-1]), flush=True)

        def autocast(module):
            def fn():
                with torch.autocast(device, dtype=torch.bfloat16):
                    return module(x)
            return fn

        if not compile_only:
            variant("meta autocast", autocast(meta_enc))
            variant("ours fp32", lambda: enc(x))
            variant("ours autocast", autocast(enc))
        meta_enc.cpu()
        enc_bf16 = copy.deepcopy(enc).to(torch.bfloat16)
        enc.cpu()
        xb = x.to(torch.bfloat16)
        if not compile_only:
            variant("ours bf16", lambda: enc_bf16(xb))
            vit.GPU_REL_POS = "bias"  # A/B: the additive-bias attention this release replaced on GPUs
            try:
                variant("ours bf16 bias-attention", lambda: enc_bf16(xb))
            finally:  # the compiled variants below run the default path
                vit.GPU_REL_POS = "augmented"
    if compile_:
        compiled = torch.compile(enc_bf16)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(xb)
            if cuda:
                torch.cuda.synchronize()
        setup = time.perf_counter() - t0
        with torch.inference_mode():
            variant("ours bf16 compile", lambda: compiled(xb), setup)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sam_b", "sam_h"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="only the compiled variants (and the fp32 reference)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--device", default="cuda", help="cpu: a check of the script itself (--models small)")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    rows = []
    for model in a.models:
        rows += bench_model(model, a.batch, a.repeat, a.compile or a.compile_only, a.device, a.compile_only)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'model':8s} {'variant':20s} {'ms/img':>8s} {'rel err':>9s} {'peak MiB':>9s} {'setup s':>8s}")
    for r in rows:
        print(f"{r['model']:8s} {r['variant']:20s} {r['ms_per_image']:8.2f} {r['rel_err_vs_fp32']:9.1e} "
              f"{r['peak_gpu_mib']:9.0f} {r['setup_s']:8.1f}")
    print("bars (issue 10): ViT-B half=True batch 8 <= 4 ms/image, ViT-H <= 14 ms/image")
    print("reproduce: python " + " ".join([str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
