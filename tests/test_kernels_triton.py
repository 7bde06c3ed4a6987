"""Triton shrink/expand kernels against the float64 reference.

On any machine: the kernels run under TRITON_INTERPRET=1 on small CPU shapes. The interpreter
must be switched on before triton is first imported, and a GPU run in this same process needs it
off, so the interpreted cases run in one child process (this file run as a script) that reports
one result per case; each case is then its own test here. On a CUDA machine the `gpu` tests run
the compiled kernels at realistic shapes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (T, d_in, d_out, adapters, popularity, rank_mode, prefill, dtype, split_k)
INTERP_CASES = [
    (1, 64, 96, 1, "identical", "mixed", False, "float32", None),
    (7, 129, 33, 3, "distinct", "mixed", False, "float32", None),
    (33, 64, 80, 8, "uniform", "mixed", True, "float32", None),
    (33, 96, 64, 16, "zipf", "pow2", False, "float32", None),
    (40, 72, 48, 5, "zipf", "mixed", True, "float32", 3),  # split-K path (atomic adds)
    (7, 64, 64, 7, "distinct", "mixed", False, "bfloat16", None),
    (33, 129, 96, 4, "uniform", "mixed", True, "bfloat16", None),
    (33, 80, 64, 2, "identical", "64", True, "bfloat16", 2),
]


def _case_id(c):
    return "T{}-{}x{}-a{}-{}-{}{}-{}{}".format(
        *c[:6], "-prefill" if c[6] else "", c[7], f"-splitk{c[8]}" if c[8] else ""
    )


def _run_case(c, device, fn):
    from loraplex_kernels.testing import compare, expected, make_case

    T, d_in, d_out, n, pop, rank_mode, prefill, dtype, split_k = c
    case = make_case(T, d_in, d_out, n, pop, rank_mode, dtype=getattr(torch, dtype), prefill=prefill, seed=T * 7 + n)
    want = expected(case)
    dev = case.to(device)
    meta = dev.meta()  # the step's one host sync happens here, not in the kernel call
    y = dev.y0.clone()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a device->host sync inside the call raises
    try:
        fn(y, dev.x, dev.A, dev.B, dev.scales, meta, split_k=split_k)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return compare(y, case, want)


def _interp_worker() -> None:
    """Child process: TRITON_INTERPRET=1 is set before triton's first import; prints JSON."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from loraplex_kernels.triton_shrink_expand import add_lora_triton

    results = {_case_id(c): _run_case(c, "cpu", add_lora_triton) for c in INTERP_CASES}

    # NaN beyond the rank: Triton's masked loads never read it, so it cannot leak in.
    from loraplex_kernels.testing import compare, expected, make_case

    case = make_case(9, 64, 64, 3, "uniform", "mixed", seed=4)
    want = expected(case)
    for s in range(3):
        r = int(case.ranks[s])
        case.A[s, r:] = float("nan")
        case.B[s, :, r:] = float("nan")
    y = case.y0.clone()
    add_lora_triton(y, case.x, case.A, case.B, case.scales, case.meta())
    results["nan-beyond-rank"] = compare(y, case, want)

    # y a column slice of a fused output; the other columns must not move.
    case = make_case(11, 64, 48, 3, "uniform", "mixed", seed=6)
    want = expected(case)
    fused = torch.randn(11, 48 + 32)
    fused[:, :48] = case.y0
    rest = fused[:, 48:].clone()
    add_lora_triton(fused[:, :48], case.x, case.A, case.B, case.scales, case.meta())
    res = compare(fused[:, :48], case, want)
    res["untouched"] = res["untouched"] and bool(torch.equal(fused[:, 48:], rest))
    results["fused-slice"] = res
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--interp-worker"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", INTERP_CASES, ids=_case_id)
def test_triton_interpreter_matches_reference(interp_results, case):
    from loraplex_kernels.testing import TOLERANCE

    res = interp_results[_case_id(case)]
    assert res["untouched"], "a row with idx = -1 was modified"
    assert res["err"] <= TOLERANCE[getattr(torch, case[7])], res


@needs_triton
@pytest.mark.parametrize("name", ["nan-beyond-rank", "fused-slice"])
def test_triton_interpreter_edges(interp_results, name):
    res = interp_results[name]
    assert res["untouched"] and res["err"] <= 1e-5, res


def test_package_imports_without_triton():
    """Importing the package (and the cpu/reference backends) must not import triton."""
    code = (
        "import sys; import loraplex_kernels as K; K.set_backend('cpu'); K.set_backend('reference');"
        "print('triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --- compiled kernels on a CUDA GPU -----------------------------------------------------------

GPU_CASES = [
    (32, 576, 576, 32, "distinct", "mixed", False, "bfloat16", None),
    (512, 576, 1536, 8, "zipf", "pow2", True, "bfloat16", None),
    (257, 4096, 4096, 16, "uniform", "mixed", True, "bfloat16", None),
    (7, 4096, 1024, 3, "uniform", "16", False, "bfloat16", None),
    (33, 1000, 129, 64, "zipf", "mixed", True, "float32", None),
    (64, 2048, 2048, 4, "uniform", "mixed", False, "float32", 4),
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_triton_gpu_matches_reference(case):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; the GPU test needs compiled kernels")
    from loraplex_kernels.testing import TOLERANCE
    from loraplex_kernels.triton_shrink_expand import add_lora_triton

    res = _run_case(case, "cuda", add_lora_triton)
    assert res["untouched"], "a row with idx = -1 was modified"
    assert res["err"] <= TOLERANCE[getattr(torch, case[7])], res


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    _interp_worker()
