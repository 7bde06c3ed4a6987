"""Packing a model's projections for the CPU's bfloat16 GEMM at start-up (the engine's step).

Apart from packed_linear.py because it walks the model's Projections (model/linear.py), which
themselves reach packed layers through fused_linear.py: here no import runs in a circle.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.model.linear import Projection
from loraplex.model.packed_linear import pack_linear, packing_available


def pack_projections(model: nn.Module) -> int:
    """Swap every bfloat16 CPU nn.Linear `.base` of the model's Projections for its packed form
    (packed_linear.pack_linear: our AMX kernel's panels or oneDNN's layout). Idempotent (packed
    ones are left alone); returns how many were packed."""
    if not packing_available():
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Projection) and type(module.base) is nn.Linear:
            w = module.base.weight
            if w.dtype == torch.bfloat16 and w.device.type == "cpu":
                module.base = pack_linear(module.base)
                n += 1
    return n
