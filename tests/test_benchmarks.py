"""The benchmark scripts run (in their --quick mode) so that they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_speed_quick(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--quick", "--repeat", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["job"] for r in rows][1:] == ["1 box -> original-size mask", "64 boxes -> masks", "everything, 8x8 points",
                                            "peak RSS MB, set_image + 1 box", "peak RSS MB, 64 boxes after set_image"]
    assert all(r["segany_ms"] > 0 and r["reference_ms"] > 0 for r in rows)
    # Ultralytics' columns, where the optional package is installed (they are left out otherwise).
    with_ultralytics = importlib.util.find_spec("ultralytics") is not None
    assert all(("ultralytics_ms" in r) == with_ultralytics for r in rows)


def test_bench_gpu_runs_its_attention_ab_on_the_cpu(tmp_path):
    """bench_gpu.py's own check (``--device cpu --models small``): its A/B loop makes a row for every
    attention policy, each embedding within bf16 rounding of the fp32 one. (On a CPU every policy
    takes the same bias path: this checks the script, not the GPU policies.)"""
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu",
                          "--models", "small", "--batch", "1", "--repeat", "1", "--ab", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())
    variants = [r["variant"] for r in rows]
    assert variants[:2] == ["meta autocast", "ours autocast (half=True)"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import POLICIES

    assert variants[2:] == [f"ours bf16 {policy}" for policy in POLICIES] and len(POLICIES) >= 9
    assert all("error" not in r and r["rel_err_vs_fp32"] < 0.05 for r in rows)


def test_bench_large_prompts_runs(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_large_prompts.py"), "--size", "120", "160",
                          "--repeat", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(120x160): 1 box" in res.stdout and "16 boxes" in res.stdout and "3 masks" in res.stdout
