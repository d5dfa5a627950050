#!/usr/bin/env bash
# Copies the reference package the GPU benchmarks import (Meta's segment_anything) into .gpu_site/
# (git-ignored), for the device tool's `carry`: the GPU machine's image has PyTorch but not it.
# Then, on the device, in one call:
#   PYTHONPATH=$PWD/.gpu_site:$PWD/src PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py \
#       --models sam_h sam_b --ab --compile --deadline 420 --json $OUT/gpu.json --profile $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_site && mkdir -p .gpu_site
src=$(python -c "import os, segment_anything; print(os.path.dirname(segment_anything.__file__))")
cp -r "$src" .gpu_site/
find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu_site
