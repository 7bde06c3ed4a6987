"""Release the calling thread's OpenMP worker threads (GNU libgomp's omp_pause_resource_all).

Why: libgomp keeps one pool of worker threads per thread that has run a parallel region (torch's
intra-op ops, our C kernels), for as long as that thread lives. While the pools' threads together
number no more than the CPUs, an idle worker spins (~3 ms) waiting for the next region; beyond
that, libgomp "throttles" and a worker sleeps after ~100 spins, so every parallel region first
wakes it through the kernel. A decode step is a few hundred short regions: an engine stepping on
its own thread while the thread that built it (model load, warm-up) still holds a pool ran its
steps ~1.8x slower on the 2-core dev box (1 sequence: 10 -> 17-20 ms;
benchmarks/results/engine_thread_cpu_amx.md). Engine.start() releases the starting thread's pool,
so the engine's thread holds the only one. A thread whose pool was released gets a new one at its
next parallel region: releasing is a hint about who computes next, never a loss of function.

Only libgomp (the OpenMP runtime of torch's x86 Linux wheels, which our kernels share) is asked:
its pause frees the calling thread's pool alone. Other runtimes (LLVM's libomp, Intel's libiomp)
keep one process-wide pool without this throttling, and their pause is process-wide, so nothing
is done there.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release the threads, keep the runtime

_lock = threading.Lock()
_looked = False
_pause: ctypes._CFuncPtr | None = None
_set_threads: ctypes._CFuncPtr | None = None  # omp_set_num_threads: the calling thread's count only


def _loaded_libgomp() -> str | None:
    """Path of the libgomp torch runs on (and our kernels, which link it by its soname), or None.
    Other packages may load their own renamed copy (sentencepiece's libgomp-<hash>.so): pausing
    that one would release nothing of ours. Preferred: the copy inside torch's package; else one
    named by the soname itself (libgomp.so.1)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line and "/" in line}
    torch_dir = str(Path(torch.__file__).resolve().parent)
    ours = sorted(p for p in paths if p.startswith(torch_dir) or Path(p).name == "libgomp.so.1")
    in_torch = [p for p in ours if p.startswith(torch_dir)]
    return (in_torch or ours or [None])[0]


def _look() -> None:
    global _looked, _pause, _set_threads
    with _lock:
        if _looked:
            return
        _looked = True
        path = _loaded_libgomp()
        if path is None:
            return
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            return
        if hasattr(lib, "omp_pause_resource_all"):  # OpenMP 5.0: absent from old libgomps
            lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
            _pause = lib.omp_pause_resource_all
        lib.omp_set_num_threads.argtypes, lib.omp_set_num_threads.restype = [ctypes.c_int], None
        _set_threads = lib.omp_set_num_threads


def available() -> bool:
    """True when this process runs libgomp and it can release a thread's pool."""
    _look()
    return _pause is not None


def release_thread_pool() -> bool:
    """Releases the calling thread's OpenMP worker threads (they exit); True when done. Must not
    be called from inside a parallel region (libgomp refuses: False)."""
    return available() and _pause(OMP_PAUSE_SOFT) == 0


def one_thread() -> None:
    """This thread's torch work (and our kernels') on one OpenMP thread from now on, so that it
    never makes a pool of its own: for helper threads next to a busy engine (adapter calls,
    structured-output masks, the adapter prefetcher). torch.set_num_threads(1) would do it too,
    but it also sets torch's process-wide default, which threads that start later (an engine's, a
    model loader's) inherit."""
    _look()
    if _set_threads is None:
        torch.set_num_threads(1)
        return
    torch.get_num_threads()  # torch's per-thread set-up first: it would later set the default count
    _set_threads(1)
