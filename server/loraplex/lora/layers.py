"""The LoRA side of a projection: its group's pool table and the bound batched kernel.

Projections that read the same x (q/k/v; gate/up) form one PoolGroup, applied in one kernel call
(one pass over the rows, a shared shrink where the members' A blocks are adjacent); o and down
are groups of one. Each Projection (model/linear.py) holds its PoolMember as `lora_weights`;
`project_all` sees that the members form one group and calls `group.apply` once.

The table (loraplex_kernels.PoolTable) says, per slot and member, where that adapter's A and Bt
blocks sit in the pool, their real rank (0 = not targeted) and scale; the manager rewrites rows
as adapters enter and leave the pool (lora/pool.py). Weights are never stored here.
"""

from __future__ import annotations

import torch

from loraplex_kernels import BoundPooled, PoolTable


class PoolGroup:
    def __init__(self, pool: torch.Tensor, num_slots: int, d_in: int, d_outs: list[int]):
        self.table = PoolTable(len(d_outs), num_slots, d_in, tuple(d_outs), pool.device)
        self._op = BoundPooled(pool, self.table)  # pool [capacity]: fixed for the server's life
        self.members = [PoolMember(self, i) for i in range(len(d_outs))]

    def targeted(self, lora, member: int) -> bool:
        """Does any adapter of this step target this member? Plain Python sets, no device sync:
        a step whose adapters all skip a module (q/v adapters at gate/up/down) costs nothing there."""
        return not self.table.targets(member).isdisjoint(lora.meta.active_slots)

    def due_members(self, lora) -> tuple[int, ...]:
        """The members some adapter of this step targets (apply adds their deltas)."""
        return tuple(m for m in range(len(self.members)) if self.targeted(lora, m))

    def native_call(self, members: tuple[int, ...]):
        """The compiled pooled kernel bound to this group for `members` (lora_native.PreparedPool)
        when `apply` would run it; None when it would run another formulation."""
        return self._op.native_call(members)

    def apply(self, ys: list[torch.Tensor], x: torch.Tensor, lora) -> None:
        """ys[m] [T, out_m] += member m's per-token LoRA delta of x [T, in], for the members some
        adapter of the step targets."""
        members = self.due_members(lora)
        if members:
            self._op(ys, x, lora.meta, members)


class PoolMember:
    """One projection's handle on its group (Projection.lora_weights)."""

    def __init__(self, group: PoolGroup, index: int):
        self.group, self.index = group, index

    def due(self, lora) -> bool:
        """Does any adapter of this step target this projection (a delta to add)?"""
        return self.group.targeted(lora, self.index)

    def apply(self, y: torch.Tensor, x: torch.Tensor, lora) -> None:
        """y [T, out] += this projection's per-token LoRA delta of x [T, in]."""
        if self.group.targeted(lora, self.index):
            ys: list = [None] * len(self.group.members)
            ys[self.index] = y
            self.group._op(ys, x, lora.meta, (self.index,))
