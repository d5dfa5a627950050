"""The benchmark scripts run (in their --quick mode) so that they cannot rot."""

from __future__ import annotations

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
    assert [r["job"] for r in rows][1:] == ["1 box -> original-size mask", "64 boxes -> masks",
                                            "peak RSS MB, set_image + 1 box", "peak RSS MB, 64 boxes after set_image"]
    assert all(r["segany_ms"] > 0 and r["reference_ms"] > 0 for r in rows)
