"""benchmarks/profile_decode.py end to end on the embedded default model, tiny settings: its
labels patch the model's and engine's functions by name, so a renamed function breaks it (it
did once); this runs it as written in a subprocess and checks its report adds up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("layers", ["compiled", "python"])
def test_profile_decode_runs_and_adds_up(tmp_path, layers):
    out = tmp_path / "profile.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_decode.py"), "--steps", "1",
                           "--batch", "3", "--adapters", "2", "--layers", layers, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    rows = {m.group(1): [float(v) for v in m.group(2, 3)]
            for m in re.finditer(r"^\| (?:\*\*)?([^|*]+?)(?:\*\*)? \| ([\d.-]+) \| \d+ % \| ([\d.-]+) \| \d+ % \|$",
                                 text, re.M)}
    assert "whole step" in rows and "sampler" in rows and "compiled layers" in rows
    for case in (0, 1):  # the parts add up to the whole step (rounded to 0.1 ms each)
        parts = sum(v[case] for k, v in rows.items() if k != "whole step")
        assert abs(parts - rows["whole step"][case]) <= 0.1 * len(rows)
        assert rows["whole step"][case] > 0
    from loraplex_kernels import gemm_amx_native

    compiled = layers == "compiled" and gemm_amx_native.available()
    assert ("Inside the compiled layers" in text) == compiled
    assert (rows["compiled layers"][0] > 0) == compiled
    per_byte = re.search(r"= \*\*([\d.]+) GB/s\*\*; the LoRA part reads \d+ MB in [\d.]+ ms = \*\*([\d.]+) GB/s\*\*", text)
    assert (per_byte is not None) == compiled  # the timed phases exist only in the compiled layers
    if per_byte:
        assert float(per_byte.group(1)) > 0 and float(per_byte.group(2)) > 0
    if not compiled:
        assert rows["projections"][0] > 0 and rows["attention"][0] > 0
