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


@torch.no_grad()
def add_lora_pooled_reference(ys: list[torch.Tensor], x: torch.Tensor, pool: torch.Tensor, table,
                              meta: LoraMeta, members: tuple[int, ...]) -> None:
    """add_lora_pooled as its Semantics read, one token and member at a time, in float64: each
    member's blocks sliced out of the pool by the table's offsets and that member's own rank."""
    idx = meta.token_slots.tolist()  # [T]
    a_offs, bt_offs, ranks = (t.tolist() for t in (table.a_offs, table.bt_offs, table.ranks))  # [M][slots]
    scales = table.scales.tolist()
    for t, s in enumerate(idx):
        if s < 0:
            continue
        for m in members:
            r = ranks[m][s]
            if r == 0:
                continue  # the slot's adapter does not target member m
            d_in, d_out = table.d_in, table.d_outs[m]
            a = pool[a_offs[m][s]:a_offs[m][s] + r * d_in].view(r, d_in).double()  # [r, in]
            bt = pool[bt_offs[m][s]:bt_offs[m][s] + r * d_out].view(r, d_out).double()  # [r, out]
            delta = scales[m][s] * ((x[t].double() @ a.T) @ bt)  # [out]
            ys[m][t] = (ys[m][t].double() + delta).to(ys[m].dtype)
