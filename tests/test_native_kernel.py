"""The compiled per-row CPU LoRA kernel (loraplex_kernels/native.py builds, lora_native.py calls
lora_rows.c).

Its arithmetic is also checked by every "auto"/"native" case of test_kernels.py (float64
reference, random data, garbage beyond ranks, untouched idx = -1 rows). Here: the build itself
(compiled here, cached, rebuilt for another source, refused gracefully), bfloat16 rounding of the
in-place add, strided operands, threads, and the fallbacks when it cannot run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loraplex_kernels import lora_native, native
from loraplex_kernels.cpu import add_lora_multi_cpu
from loraplex_kernels.testing import TOLERANCE, compare, expected, make_case

ROOT = Path(__file__).resolve().parents[1]


def _rank_major(B: torch.Tensor) -> torch.Tensor:
    """B [slots, out, R] as the view of a contiguous [slots, R, out] tensor (the server's layout)."""
    return B.transpose(1, 2).contiguous().transpose(1, 2)


def test_builds_on_this_machine():
    """CI machines have a C compiler (README); the kernel must build there, not silently fall back."""
    if os.environ.get("LORAPLEX_NATIVE_KERNELS") == "0":
        pytest.skip("disabled by LORAPLEX_NATIVE_KERNELS=0")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine: the torch CPU path serves (tested in test_kernels.py)")
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() is None


def test_every_source_and_header_is_in_the_cache_key():
    """A header missing from native.HEADERS would leave a stale build in the kernel cache after it
    changes (the cache key hashes the sources and these headers)."""
    here = Path(native.__file__).parent
    assert {p.name for p in here.glob("*.h")} == {p.name for p in native.HEADERS}
    assert {p.name for p in here.glob("*.c")} == {p.name for p in native.SOURCES}


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT / 'server'}", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


# Runs add_lora_cpu on a random case in a fresh process and checks it against float64.
_CHECK = """
import torch
from loraplex_kernels import native, slot_weight_dtype
from loraplex_kernels.cpu import add_lora_cpu
from loraplex_kernels.testing import compare, expected, make_case
case = make_case(37, 192, 160, 5, "zipf", "mixed", seed=4)
y = case.y0.clone()
add_lora_cpu(y, case.x, case.A, case.B.transpose(1, 2).contiguous().transpose(1, 2), case.scales, case.meta())
res = compare(y, case, expected(case))
assert res["untouched"] and res["err"] <= 1e-5, res
print("available", native.available())
print("reason", native.unavailable_reason())
print("slot dtype", slot_weight_dtype(torch.bfloat16, "cpu"))
"""


def test_disabled_by_environment_falls_back_to_torch():
    proc = _python(_CHECK, LORAPLEX_NATIVE_KERNELS="0")
    assert proc.returncode == 0, proc.stderr
    assert "available False" in proc.stdout
    assert "LORAPLEX_NATIVE_KERNELS=0" in proc.stdout
    assert "slot dtype torch.float32" in proc.stdout  # the torch path's faster weight dtype


def test_failed_build_falls_back_to_torch(tmp_path):
    """A compiler that fails (here `false`): the op still answers right, through torch."""
    proc = _python(_CHECK, CC=shutil.which("false") or "false", LORAPLEX_KERNEL_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "available False" in proc.stdout and "build failed" in proc.stdout
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache


def test_missing_compiler_falls_back_to_torch(tmp_path):
    proc = _python(_CHECK, CC="no-such-compiler-here", LORAPLEX_KERNEL_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "available False" in proc.stdout and "no C compiler" in proc.stdout


def test_cache_is_reused_and_keyed_by_source(tmp_path):
    """Second process: loads the cached object (no new file); another source: a new object."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine")
    cache = tmp_path / "cache"
    first = _python(_CHECK, LORAPLEX_KERNEL_CACHE=str(cache))
    assert first.returncode == 0 and "available True" in first.stdout, first.stderr
    built = sorted(cache.glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = _python(_CHECK, LORAPLEX_KERNEL_CACHE=str(cache))
    assert again.returncode == 0 and "available True" in again.stdout, again.stderr
    assert sorted(cache.glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp
    # Another source (a comment added): must not load the stale object.
    src = tmp_path / "lora_rows.c"
    src.write_text(native.SOURCES[0].read_text() + "\n/* changed */\n")
    code = ("from pathlib import Path\nfrom loraplex_kernels import native\n"
            f"native.SOURCES = (Path({str(src)!r}),) + native.SOURCES[1:]\n") + _CHECK
    changed = _python(code, LORAPLEX_KERNEL_CACHE=str(cache))
    assert changed.returncode == 0 and "available True" in changed.stdout, changed.stderr
    assert len(list(cache.glob("*.so"))) == 2


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_add_rounds_once_to_nearest(weight_dtype):
    """bfloat16 y: the kernel adds the float32 delta to y in float32 and rounds once. Against
    round(y0 + delta) with delta in float64: equal almost everywhere, never more than one bf16
    step apart (a float32 delta can sit on the other side of a rounding boundary)."""
    case = make_case(41, 576, 320, 6, "uniform", "mixed", dtype=torch.bfloat16, weight_dtype=weight_dtype, seed=21)
    y = case.y0.clone()
    add_lora_multi_cpu([y], case.x, case.A.unsqueeze(2), [_rank_major(case.B)], case.scales.unsqueeze(1),
                       case.meta(), native=True)
    want = expected(case)  # float64
    rounded = want.to(torch.bfloat16)
    same = (y == rounded).float().mean().item()
    assert same >= 0.97, same
    ulp = (rounded.double().abs() * 2.0 ** -7).clamp(min=1e-30)  # one bf16 step (8-bit mantissa)
    assert ((y.double() - rounded.double()).abs() <= ulp + 1e-12).all()
    res = compare(y, case, want)
    assert res["untouched"] and res["err"] <= TOLERANCE[torch.bfloat16], res


def test_strided_x_and_column_slice_outputs():
    """x a strided view, outputs column slices of one fused [T, q + k + v] tensor."""
    outs = (128, 64, 64)
    cases = [make_case(23, 192, o, 4, "uniform", "mixed", seed=8) for o in outs]
    for c in cases[1:]:
        c.x = cases[0].x
    wide_x = torch.randn(23, 2 * 192)
    wide_x[:, ::2] = cases[0].x
    x = wide_x[:, ::2]  # stride (384, 2): not contiguous in its last dim -> torch path
    fused = torch.cat([c.y0 for c in cases], dim=1)
    ys = list(fused.split(outs, dim=1))  # views, row stride 256
    A = torch.stack([c.A for c in cases], dim=2)
    scales = torch.stack([c.scales for c in cases], dim=1)
    x_rows = torch.empty(23, 3 * 192)[:, :192]  # last dim contiguous, row stride 576 -> native
    x_rows.copy_(cases[0].x)
    for xin in (x, x_rows):
        fused_now = torch.cat([c.y0 for c in cases], dim=1)
        ys = list(fused_now.split(outs, dim=1))
        add_lora_multi_cpu(ys, xin, A, [_rank_major(c.B) for c in cases], scales, cases[0].meta())
        for y, c in zip(ys, cases):
            res = compare(y, c, expected(c))
            assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res


def test_more_members_than_the_kernel_takes_use_torch():
    outs = (96,) * (lora_native.MAX_MEMBERS + 1)
    cases = [make_case(19, 128, o, 3, "uniform", "mixed", seed=30) for o in outs]
    for c in cases[1:]:
        c.x = cases[0].x
    ys = [c.y0.clone() for c in cases]
    A = torch.stack([c.A for c in cases], dim=2)
    scales = torch.stack([c.scales for c in cases], dim=1)
    add_lora_multi_cpu(ys, cases[0].x, A, [_rank_major(c.B) for c in cases], scales, cases[0].meta())
    for y, c in zip(ys, cases):
        res = compare(y, c, expected(c))
        assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res
    with pytest.raises(RuntimeError, match="native LoRA kernel cannot run"):
        add_lora_multi_cpu(ys, cases[0].x, A, [_rank_major(c.B) for c in cases], scales, cases[0].meta(),
                           native=True)


def test_threads_call_it_at_once():
    """ctypes drops the GIL during the call: concurrent calls must not share scratch memory."""
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    cases = [make_case(64, 576, 576, 8, "zipf", "mixed", seed=50 + i) for i in range(4)]
    outs: list = [None] * len(cases)

    def run(i):
        c = cases[i]
        y = c.y0.clone()
        for _ in range(20):
            y.copy_(c.y0)
            add_lora_multi_cpu([y], c.x, c.A.unsqueeze(2), [_rank_major(c.B)], c.scales.unsqueeze(1), c.meta(),
                               native=True)
        outs[i] = y

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for y, c in zip(outs, cases):
        res = compare(y, c, expected(c))
        assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res


def test_prepared_calls_are_cached_per_weight_set():
    case = make_case(9, 64, 64, 2, "uniform", "mixed", seed=1)
    A, Bt = case.A.unsqueeze(2), case.B.transpose(1, 2).contiguous()
    first = lora_native.prepare(A, [Bt], case.scales.unsqueeze(1), (0,))
    assert lora_native.prepare(A, [Bt], case.scales.unsqueeze(1), (0,)) is first
    other = lora_native.prepare(A, [Bt.clone()], case.scales.unsqueeze(1), (0,))
    assert other is not first


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_built_with_openmp_when_the_compiler_has_it(tmp_path):
    """Where the compiler builds an OpenMP program, the kernels must be the multi-threaded build
    (not silently the single-threaded fallback)."""
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    src = tmp_path / "omp.c"
    src.write_text("#include <omp.h>\nint f(void) { return omp_get_max_threads(); }\n")
    cc = shutil.which(os.environ.get("CC", "cc"))
    probe = subprocess.run([cc, *native.OPENMP_FLAGS, "-shared", "-fPIC", str(src), "-o", str(tmp_path / "omp.so")],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"this compiler has no OpenMP: {probe.stderr.strip()[:200]}")
    assert native.multithreaded()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rows", "adapters", "dist"), [(64, 32, "distinct"), (512, 4, "uniform"),
                                                         (37, 5, "zipf"), (9, 9, "identical")])
def test_same_bits_on_any_thread_count(restore_threads, weight_dtype, rows, adapters, dist):
    """Every row is computed by one thread alone: 1, 2 and 3 threads give identical outputs, all
    within tolerance of float64 (the split cuts runs of one slot's rows at varied places)."""
    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    outs = (192, 64, 64)
    cases = [make_case(rows, 160, o, adapters, dist, "mixed", seed=70 + rows) for o in outs]  # one idx/ranks
    for c in cases[1:]:
        c.x = cases[0].x
    A = torch.stack([c.A for c in cases], dim=2).to(weight_dtype)
    Bs = [_rank_major(c.B).to(weight_dtype) for c in cases]
    scales = torch.stack([c.scales for c in cases], dim=1)
    results = {}
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        ys = [c.y0.clone() for c in cases]
        add_lora_multi_cpu(ys, cases[0].x, A, Bs, scales, cases[0].meta(), native=True)
        results[n] = ys
    for n in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[n])), n
    if weight_dtype == torch.float32:
        for y, c in zip(results[2], cases):
            res = compare(y, c, expected(c))
            assert res["untouched"] and res["err"] <= TOLERANCE[torch.float32], res


def test_compiler_without_openmp_builds_single_threaded(tmp_path):
    """When the OpenMP build fails, the kernels are built without it (right results, one thread)."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine")
    code = ("from loraplex_kernels import native\nnative.OPENMP_FLAGS = ('-fno-such-openmp-flag',)\n" + _CHECK
            + "print('multithreaded', native.multithreaded())\n")
    proc = _python(code, LORAPLEX_KERNEL_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "available True" in proc.stdout and "multithreaded False" in proc.stdout, proc.stdout


@pytest.mark.skipif(not native.available(), reason="compiled CPU kernels unavailable")
def test_a_function_asked_for_with_other_argtypes_is_refused():
    """ctypes converts every call's arguments by the argtypes the function was first set up with:
    a second caller declaring other types would pass garbage silently, so it is refused."""
    import ctypes

    first = native.function("loraplex_argmax_available", [])
    assert native.function("loraplex_argmax_available", []) is first
    with pytest.raises(ValueError, match="argtypes"):
        native.function("loraplex_argmax_available", [ctypes.c_int64])
