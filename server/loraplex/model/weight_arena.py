"""The packed projection weights moved into one huge-page arena (loraplex_kernels/hugepages.py).

A decode step streams every packed weight once; on 4 KiB pages each 4 KiB of them is a TLB miss
and a page walk. After packing (engine.pack_cpu_weights) and before anything keeps their
addresses (compiled_layers.attach), every packed panel set is copied into one arena advised for
2 MiB pages, and the module holds the copy. One arena, not one per tensor: each would round up to
whole huge pages. Not bit-changing: the same bytes at another address.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex_kernels import hugepages


def move_to_huge_pages(model: nn.Module) -> int:
    """Copy the model's packed weights (the `.packed` tensors of AmxLinear and WidenedLinear; not
    oneDNN's opaque ones) into one huge-page arena; returns the bytes moved (0: none, or
    LORAPLEX_HUGEPAGES=0)."""
    if not hugepages.wanted():
        return 0
    mods = [m for m in model.modules() if _movable(getattr(m, "packed", None))]
    if not mods:
        return 0
    slots = hugepages.carve([(tuple(m.packed.shape), m.packed.dtype) for m in mods])
    for m, t in zip(mods, slots):  # one at a time: each old tensor is freed as soon as it is copied
        m.packed = t.copy_(m.packed)
    return sum(t.numel() * t.element_size() for t in slots)


def _movable(t) -> bool:
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type == "cpu"
            and t.is_contiguous())
