"""The oracle: add_lora written as the contract reads, one token at a time, in float64.

Deliberately independent of the sorted/bucketed metadata the fast backends use: it reads only the
token -> slot index and the per-slot ranks, and slices A/B to each slot's real rank. Slow; meant for
tests and as the executable definition of the op.
"""

from __future__ import annotations

import torch

from .meta import LoraMeta


@torch.no_grad()
def add_lora_reference(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       scales: torch.Tensor, meta: LoraMeta) -> None:
    """y[t] += scale[s] * (x[t] @ A[s, :r].T) @ B[s, :, :r].T for s = idx[t] >= 0, r = rank[s]."""
    idx = meta.token_slots.tolist()  # [T]
    ranks = meta.slot_ranks.tolist()  # [slots]
    for t, s in enumerate(idx):
        if s < 0:
            continue
        r = ranks[s]
        a = A[s, :r, :].double()  # [r, in]
        b = B[s, :, :r].double()  # [out, r]
        delta = float(scales[s]) * ((x[t].double() @ a.T) @ b.T)  # [out]
        y[t] = (y[t].double() + delta).to(y.dtype)
