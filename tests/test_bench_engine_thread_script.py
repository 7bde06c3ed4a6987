"""benchmarks/bench_engine_thread.py end to end on the embedded default model, tiny settings: it
runs, and its table has every case's tokens/s for each batch size (one round, a few tokens)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_engine_thread_runs(tmp_path):
    out = tmp_path / "engine_thread.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_engine_thread.py"), "--batches", "1,2",
                           "--tokens", "4", "--rounds", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", out.read_text(), re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(float(v) > 0 for r in rows for v in r[1:])
