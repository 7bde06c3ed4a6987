"""scripts/gpu_check.py's CPU-side logic: the plan it runs, and its GPU targets judged on synthetic
numbers (the check itself needs a CUDA machine; it has never run on one from this suite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check as gc  # noqa: E402
import gpu_kernels  # noqa: E402


def test_plan_covers_the_issue_within_the_budget(tmp_path):
    plan = gc.steps(tmp_path, python="py")
    argvs = [" ".join(s.argv) for s in plan]
    assert any("-m pytest -m gpu" in a for a in argvs)
    assert any(a.endswith("benchmarks/gpu_kernels.py") for a in argvs)
    many = next(a for a in argvs if "bench_many_adapters.py" in a)
    assert "--device cuda" in many and "--quantize nf4 --quantize-embeddings" in many
    assert f"--cases qv8:{gc.ADAPTERS_N}" in many
    assert sum(s.timeout_s for s in plan) <= gc.BUDGET_SECONDS


def test_dry_run_lists_steps_and_targets_without_running(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith("preflight: ")
    assert "1. gpu-marked tests" in out and "2. Triton kernel" in out and "3. 1000 adapters" in out
    assert "80 % of HBM" in out and "0.9x base" in out and "0.3x float16" in out
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "a CUDA device" in proc.stderr


@pytest.mark.parametrize("output, ok", [
    ("....s\n4 passed, 1 skipped in 3.10s", True),
    ("F...\n1 failed, 3 passed in 2.00s", False),
    ("ss\n2 skipped in 0.1s", False),  # a skip is not a pass
    ("E\n3 passed, 1 error in 1.0s", False),
    ("no tests ran in 0.01s", False),
])
def test_check_pytest(output, ok):
    assert gc.check_pytest(output).ok is ok


def _row(gbps, mib, decode=True):
    return dict(scenario="s", projection="p", decode=decode, bytes=int(mib * 2**20), triton_us=1.0,
                loop_us=2.0, triton_gbps=gbps)


def test_check_kernel_bandwidth():
    small_slow = _row(50.0, 1)  # launch-bound row: listed, not judged
    prefill_slow = _row(100.0, 64, decode=False)
    good = {"hbm_gbps": 3000.0, "rows": [_row(2500.0, 10), _row(2450.0, 70), small_slow, prefill_slow]}
    assert gc.check_kernel_bandwidth(good).ok  # worst judged: 2450 / 3000 = 82 %
    bad = {"hbm_gbps": 3000.0, "rows": [_row(2500.0, 10), _row(2300.0, 70)]}  # 77 %
    check = gc.check_kernel_bandwidth(bad)
    assert not check.ok and "77 %" in check.detail
    assert not gc.check_kernel_bandwidth({"hbm_gbps": 3000.0, "rows": [small_slow, prefill_slow]}).ok
    assert not gc.check_kernel_bandwidth({"hbm_gbps": None, "rows": [_row(2500.0, 10)]}).ok
    assert not gc.check_kernel_bandwidth({**good, "checks_failed": True}).ok


def _case(n, warm, cold=0.8):
    return dict(kind="qv8", n=n, popularity="uniform", warm=warm, cold=cold, base=100.0, base_running=30.0)


def test_check_adapters():
    assert gc.check_adapters({"cases": [_case(1000, 0.95), _case(1000, 0.91)]}).ok
    assert not gc.check_adapters({"cases": [_case(1000, 0.95), _case(1000, 0.89)]}).ok
    assert not gc.check_adapters({"cases": [_case(500, 1.0)]}).ok  # too few adapters to count


def test_check_nf4_bytes():
    assert gc.check_nf4_bytes({"quantize": "nf4", "base_bytes": 28, "fp16_bytes": 100}).ok
    assert not gc.check_nf4_bytes({"quantize": "nf4", "base_bytes": 31, "fp16_bytes": 100}).ok
    assert not gc.check_nf4_bytes({"quantize": "none", "base_bytes": 10, "fp16_bytes": 100}).ok


def test_evaluate_reads_the_step_files_and_fails_missing_ones(tmp_path):
    checks = gc.evaluate(tmp_path, None)
    assert len(checks) == 4 and not any(c.ok for c in checks)
    (tmp_path / "kernels_gpu.json").write_text(json.dumps({"hbm_gbps": 3000.0, "rows": [_row(2700.0, 20)]}))
    (tmp_path / "many_adapters_gpu.json").write_text(json.dumps(
        {"quantize": "nf4", "base_bytes": 25, "fp16_bytes": 100, "cases": [_case(1000, 0.93)]}))
    checks = gc.evaluate(tmp_path, "10 passed in 5s")
    assert [c.ok for c in checks] == [True, True, True, True]


def test_lora_bytes_against_a_direct_count():
    from loraplex_kernels.testing import make_case

    case = make_case(37, 48, 80, 5, "zipf", "mixed", max_rank=16, dtype=torch.bfloat16, seed=3)
    idx, ranks = case.idx.tolist(), case.ranks.tolist()
    want = 0
    for s in sorted({s for s in idx if s >= 0}):
        want += ranks[s] * 48 * 2 + 80 * ranks[s] * 2  # A[s, :r, :] and B[s, :, :r], bfloat16
    for s in idx:
        if s >= 0:
            want += 48 * 2 + 80 * 2 * 2  # x row read; y row read and written
    assert gpu_kernels.lora_bytes(case) == want


def test_the_kernel_target_has_decode_rows_to_judge():
    """At least one decode scenario x shape of gpu_kernels.py moves enough bytes to be judged
    (otherwise the bandwidth target could never be met)."""
    from types import SimpleNamespace

    from loraplex_kernels.testing import make_case

    sizes = []
    for T, n, prefill, rank_mode in gpu_kernels.SCENARIOS.values():
        if prefill:
            continue
        # make_case draws ranks and idx before the weights, so 1x1 weights give the benchmark's
        # ranks and idx without generating its 14336-wide random matrices.
        tiny = make_case(T, 1, 1, n, "uniform", rank_mode, max_rank=64, prefill=False, none_frac=0.1, seed=1)
        for d_in, d_out in gpu_kernels.SHAPES.values():
            case = SimpleNamespace(idx=tiny.idx, ranks=tiny.ranks, A=torch.empty(0, dtype=torch.bfloat16),
                                   x=torch.empty(T, d_in, dtype=torch.bfloat16),
                                   y0=torch.empty(T, d_out, dtype=torch.bfloat16))
            sizes.append(gpu_kernels.lora_bytes(case))
    assert sum(b >= gc.KERNEL_MIN_BYTES for b in sizes) >= 2
