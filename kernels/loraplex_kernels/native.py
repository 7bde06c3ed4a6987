"""The CPU backend's compiled kernels (lora_rows.c, decode_attention.c, rmsnorm.c, rotary.c, gemm_bf16.c, gemm_panels.c): one shared object, built
on first use, cached, loaded with ctypes. The calls live in lora_native.py and attention_native.py.

Why compile at run time instead of shipping a binary: `-march=native` lets the compiler use the
vector width of the machine that serves (AVX-512 here, AVX2 or NEON elsewhere), and the source is
dependency-free C that builds in about a second. The shared object is cached under
$LORAPLEX_KERNEL_CACHE (default ~/.cache/loraplex/kernels), keyed by a hash of the sources, the
flags, the compiler's version and this CPU's model and flags, so a different machine or a changed
source never loads a stale build. Written to a temporary name and renamed, so processes starting
together cannot load half a file.

No C compiler, a failed build or LORAPLEX_NATIVE_KERNELS=0: `available()` is False (the reason is
in `unavailable_reason()`) and the torch formulations run instead (cpu.py, model/attention.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f) for f in (
    "lora_rows.c", "decode_attention.c", "rmsnorm.c", "rotary.c", "gemm_bf16.c", "gemm_panels.c",
    "gemm_amx.c", "decode_layers.c", "argmax.c", "sample_rows.c"))
HEADERS = tuple(Path(__file__).with_name(f) for f in ("bf16.h", "parallel.h", "widen.h", "gemm_panels.h", "silu.h", "layer_kernels.h", "prefetch.h", "exp_nonpos.h", "kv_int8.h"))  # included by the sources: part of the cache key
# Reassociation lets the compiler vectorise the dot products (float sums in another order: the
# results differ from a sequential sum by rounding only, like any BLAS).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11")
LIBS = ("-lm",)
# Tried first: the kernels split a call over torch's intra-op threads (parallel.h); a compiler
# without OpenMP builds them single-threaded instead.
OPENMP_FLAGS = ("-fopenmp",)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# The int8 KV cache's code (layer_kernels.h LP_I8): caches only, with per-(slot, head) scales.
KV_INT8 = 2


def kv_scale_ptr(scale: torch.Tensor | None, cache: torch.Tensor) -> int:
    """The data pointer of an int8 cache's scales, checked: [num_blocks, block_size, H_kv] float32
    contiguous, so that the kernels find slot s's heads at s * H_kv."""
    if scale is None or scale.dtype != torch.float32 or not scale.is_contiguous() or scale.shape != cache.shape[:3]:
        raise ValueError(f"an int8 cache {tuple(cache.shape)} needs contiguous float32 scales {tuple(cache.shape[:3])}, "
                         f"got {None if scale is None else (scale.dtype, tuple(scale.shape))}")
    return scale.data_ptr()


def kv_operands(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                v_scale: torch.Tensor | None) -> tuple[int, int | None, int | None]:
    """A KV cache pair as the kernels take it: (its dtype code, k / v scale pointers); the scales
    are checked (kv_scale_ptr) for an int8 cache and NULL for a float one."""
    if k_cache.dtype != torch.int8:
        return DTYPE_CODES[k_cache.dtype], None, None
    return KV_INT8, kv_scale_ptr(k_scale, k_cache), kv_scale_ptr(v_scale, v_cache)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False
_openmp = False

def _cpu_id() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_KERNEL_CACHE", Path.home() / ".cache" / "loraplex" / "kernels"))


def _build(cc: str, extra: tuple[str, ...] = ()) -> Path:
    flags = (*FLAGS, *extra)
    source = b"\0".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:24]
    target = cache_dir() / f"loraplex_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, f"-I{HEADERS[0].parent}", *map(str, SOURCES), "-o", tmp, *LIBS],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> None:
    global _lib, _reason, _tried
    _tried = True
    if os.environ.get("LORAPLEX_NATIVE_KERNELS", "1") == "0":
        _reason = "disabled by LORAPLEX_NATIVE_KERNELS=0"
        return
    cc = _compiler()
    if cc is None:
        _reason = f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH)"
        return
    global _openmp
    errors = []
    for extra in (OPENMP_FLAGS, ()):
        try:
            lib = ctypes.CDLL(str(_build(cc, extra)))
        except Exception as exc:  # any build or load failure: try without OpenMP, then torch
            errors.append(f"{' '.join(extra) or 'without OpenMP'}: {exc}")
            continue
        _lib, _openmp = lib, bool(extra)
        if errors:
            log.info("compiled CPU kernels built single-threaded (%s)", errors[0])
        return
    _reason = "build failed: " + "; ".join(errors)
    log.warning("compiled CPU kernels unavailable, using the torch formulations: %s", _reason)


def describe() -> str:
    """One line for logs and reports: what runs compiled, and on how many threads."""
    if not available():
        return f"compiled CPU kernels off, torch formulations instead: {unavailable_reason()}"
    threads = (f"each call split over the calling thread's torch threads ({torch.get_num_threads()} here)"
               if multithreaded() else "single-threaded (no OpenMP)")
    return f"compiled CPU kernels on (LoRA rows: slot tensors and pool, paged attention, RMSNorm, rotary, bfloat16 GEMM; {threads})"


def multithreaded() -> bool:
    """Built with OpenMP: a call runs on the calling thread's torch intra-op thread count."""
    return available() and _openmp


def available() -> bool:
    """Are the compiled kernels loaded (building them on the first call)?"""
    if not _tried:
        with _lock:
            if not _tried:
                _load()
    return _lib is not None


def unavailable_reason() -> str | None:
    available()
    return _reason


_functions: dict[str, Callable] = {}


def function(name: str, argtypes: list) -> Callable:
    """A C function of the library (restype int: 0 = done, -1 = out of scratch memory), set up
    once per name: callers may ask for it on every call. Asking for it with other argtypes than
    the first caller's is refused (ctypes would convert the arguments by the first list)."""
    fn = _functions.get(name)
    if fn is None:
        if not available():
            raise RuntimeError(f"compiled CPU kernels unavailable: {_reason}")
        fn = getattr(_lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes
        _functions[name] = fn
    elif tuple(fn.argtypes) != tuple(argtypes):
        raise ValueError(f"{name} was set up with argtypes {fn.argtypes}, asked for with {tuple(argtypes)}")
    return fn
