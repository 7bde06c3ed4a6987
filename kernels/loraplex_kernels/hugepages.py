"""Transparent huge pages for the large tensors a decode step streams through.

A decode step reads every packed weight once (~270 MB on the default model), and the adapters'
blocks and the KV cache beside them. On 4 KiB pages that is a new page, and so a TLB miss and a
page walk, every 64 cache lines, and most Linux hosts give anonymous memory huge pages only where
it is asked for (/sys/kernel/mm/transparent_hugepage/enabled = madvise). On the AMX dev VM a
plain read of 512 MiB ran at 29 GB/s on 2 MiB pages against 23.5 on 4 KiB ones, and the decode
step's weight matrices, read one after another, at 27-30 against 21-22 GB/s.

    buf = arena(nbytes)            # uint8 [nbytes], 2 MiB-aligned, advised before its first touch
    t = empty(shape, dtype)        # a tensor on huge pages where it is large enough to matter
    ts = carve([(shape, dtype)])   # several empty tensors, one arena for all

Nothing here is required: where madvise is refused (not Linux, THP off, a sandbox) the memory is
ordinary and only slower. LORAPLEX_HUGEPAGES=0 turns the advice off.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

HUGE = 2 << 20  # the x86-64 huge page
ALIGN = 64  # each tensor carved from an arena starts on a cache line (the kernels' vector loads)
_MADV_HUGEPAGE = 14
_madvise = None


def wanted() -> bool:
    """Linux, CPU tensors, and not turned off (LORAPLEX_HUGEPAGES=0)."""
    return sys.platform.startswith("linux") and os.environ.get("LORAPLEX_HUGEPAGES", "1") != "0"


def _advise(addr: int, length: int) -> bool:
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.madvise
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return bool(_madvise) and length > 0 and _madvise(addr, length, _MADV_HUGEPAGE) == 0


def arena(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] starting on a 2 MiB boundary, advised for huge pages before anything touches
    it (the kernel then backs each 2 MiB of it with one huge page at its first fault). Small
    requests, or with the advice off, get plain memory."""
    if nbytes < HUGE or not wanted():
        return torch.empty(nbytes, dtype=torch.uint8)
    # Slack to reach the next boundary; untouched, it costs address space, not memory.
    raw = torch.empty(nbytes + HUGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE
    buf = raw[start:start + nbytes]  # the view keeps `raw` alive
    length = -(-nbytes // HUGE) * HUGE  # whole huge pages: the last one may reach into the slack
    _advise(buf.data_ptr(), min(length, raw.numel() - start))
    return buf


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on huge pages when it is at least one huge page."""
    elem = torch.empty((), dtype=dtype).element_size()
    return arena(_numel(shape) * elem).view(dtype).view(*shape)


def zeros(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    return empty(shape, dtype).zero_()


def carve(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Empty contiguous tensors of these (shape, dtype)s, carved from one arena: a tensor per
    arena would round each up to whole huge pages (up to 2 MiB of memory each)."""
    offsets, total = [], 0
    for shape, dtype in specs:
        total = -(-total // ALIGN) * ALIGN
        offsets.append(total)
        n = 1
        for d in shape:
            n *= int(d)
        total += n * torch.empty((), dtype=dtype).element_size()
    buf = arena(total)
    out = []
    for (shape, dtype), off, end in zip(specs, offsets, offsets[1:] + [total]):
        out.append(buf[off:end].view(dtype)[:_numel(shape)].view(*shape))
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
