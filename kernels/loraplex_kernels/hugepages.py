"""Transparent huge pages for the large tensors a decode step streams through.

A decode step reads every packed weight once (~270 MB on the default model), and the adapters'
blocks and the KV cache beside them. On 4 KiB pages that is a new page, and so a TLB miss and a
page walk, every 64 cache lines, and most Linux hosts give anonymous memory huge pages only where
it is asked for (/sys/kernel/mm/transparent_hugepage/enabled = madvise). On the AMX dev VM the
decode step's weight matrices, read one after another by a plain reduction, streamed at 27-30
GB/s on 2 MiB pages against 21-25 on 4 KiB ones; our own kernels, which prefetch, gain less (the
LoRA phase 8-15 %, a one-sequence step ~4 %: benchmarks/results/roofline_cpu_amx.md).

    buf = arena(nbytes)            # uint8 [nbytes], 2 MiB-aligned, advised before its first touch
    t = empty(shape, dtype)        # a tensor on huge pages where it is large enough to matter
    ts = carve([(shape, dtype)])   # several empty tensors, one arena for all

Nothing here is required: where madvise is refused (not Linux, THP off, a sandbox) the memory is
ordinary and only slower. LORAPLEX_HUGEPAGES=0 turns the advice off.
"""

from __future__ import annotations

import mmap
import os
import sys

import torch

HUGE = 2 << 20  # the x86-64 huge page
ALIGN = 64  # each tensor carved from an arena starts on a cache line (the kernels' vector loads)


def wanted() -> bool:
    """Linux, and not turned off (LORAPLEX_HUGEPAGES=0)."""
    return sys.platform.startswith("linux") and os.environ.get("LORAPLEX_HUGEPAGES", "1") != "0"


def arena(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] starting on a 2 MiB boundary, advised for huge pages before anything touches
    it (the kernel then backs each 2 MiB of it with one huge page at its first fault). Small
    requests, or with the advice off, get plain memory.

    Its own private anonymous mapping, not the allocator's: memory the allocator hands out again
    may already be backed by 4 KiB pages, which the advice does not change (a test saw no huge
    page at all for an 8 MiB torch.empty late in a long process). The tensor keeps the mapping
    alive; it is unmapped with the last tensor that uses it."""
    if nbytes < HUGE or not wanted():
        return torch.empty(nbytes, dtype=torch.uint8)
    length = -(-nbytes // HUGE) * HUGE  # whole huge pages
    # One huge page of slack to reach the next boundary; never touched, it costs address space.
    mm = mmap.mmap(-1, length + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, start, length)
    except (AttributeError, OSError):  # no such advice here: ordinary pages
        pass
    return raw[start:start + nbytes]


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on huge pages when it is at least one huge page."""
    return carve([(tuple(shape), dtype)])[0]


def carve(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Empty contiguous tensors of these (shape, dtype)s, carved from one arena: a tensor per
    arena would round each up to whole huge pages (up to 2 MiB of memory each)."""
    offsets, total = [], 0
    for shape, dtype in specs:
        total = -(-total // ALIGN) * ALIGN
        offsets.append(total)
        total += _numel(shape) * torch.empty((), dtype=dtype).element_size()
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
