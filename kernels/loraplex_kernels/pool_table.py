"""Where each slot's adapter weights sit in the adapter memory pool, for one projection group.

The pool is one flat 1-D tensor (the slot weight dtype) in which every resident adapter occupies
exactly its real bytes: per targeted module an A block [r, d_in] and a Bt block (B transposed)
[r, d_out], each row-major and contiguous, at element offsets the adapter manager chose. A
projection group (the M projections that read the same x: q/k/v -> 3, gate/up -> 2, o or down ->
1) reads the pool through one PoolTable: per member and slot, the two offsets, the real rank and
the scale. `add_lora_pooled` (loraplex_kernels/__init__.py) is the op that follows it.

Worked example: d_in 4, members q (d_out 4) and v (d_out 2), 3 slots. Slot 0 holds an adapter of
rank 2 on q and v, slot 2 one of rank 1 on v only (q untouched), slot 1 is empty:

    pool:  [A_q0 (2x4) | A_v0 (2x4) | Bt_q0 (2x4) | Bt_v0 (2x2) | ... | A_v2 (1x4) | Bt_v2 (1x2)]
    offs:   0            8            16            24                  40           44
    a_offs  = [[0, 0, 0], [8, 0, 40]]     # [M, slots]: q row, v row
    bt_offs = [[16, 0, 0], [24, 0, 44]]
    ranks   = [[2, 0, 0], [2, 0, 1]]      # 0: the slot's adapter does not target that member
    scales  = [[s0, 0, 0], [s0, 0, s2]]

A_q0 and A_v0 are adjacent with equal rank: the compiled CPU kernel then reads them as one
[2 * 2, 4] block (rank k of member m is row m * r + k) in a single pass over x.

The table is preallocated once at server start and its entries rewritten in place (`set`,
`clear`), so kernel bindings may keep the tensors' data pointers. On the CPU the writes go
through numpy views of the same memory (~0.1 us each instead of ~10 us for a tensor index write);
elsewhere each write is a small host -> device copy (the manager may keep host mirrors and copy in
bulk instead). A Python set per member says which slots target it, so "does any adapter of this
step touch member m" is answered on the host with no device sync.
"""

from __future__ import annotations

import torch


class PoolTable:
    """One projection group's indirection into the pool (see the module docstring).

        a_offs:  [M, slots] int64  element offset in `pool` of member m's A block [r, d_in]
        bt_offs: [M, slots] int64  element offset of member m's Bt block [r, d_outs[m]]
        ranks:   [M, slots] int64  member m's real rank in slot s (0: not targeted, read nothing)
        scales:  [M, slots] float32
    """

    # Bumped by every table made and every entry written, in any table: a caller that derives
    # something from the tables' contents (model/compiled_layers.py's per-step LoRA plan) keeps it
    # while this stays the same.
    generation = 0

    def __init__(self, num_members: int, num_slots: int, d_in: int, d_outs: tuple[int, ...], device=None):
        if num_members < 1 or len(d_outs) != num_members:
            raise ValueError(f"{num_members} members need as many output sizes, got {tuple(d_outs)}")
        if num_slots < 0 or d_in < 1 or any(d < 1 for d in d_outs):
            raise ValueError(f"bad table shape: {num_slots} slots, d_in {d_in}, d_outs {tuple(d_outs)}")
        self.num_members, self.num_slots = int(num_members), int(num_slots)
        self.d_in, self.d_outs = int(d_in), tuple(int(d) for d in d_outs)
        device = torch.device(device if device is not None else "cpu")
        # The three integer tables are rows of one tensor, so a backend gathers a step's entries
        # of all three with one index_select (`entries`); each is a contiguous [M, slots] view.
        self.packed = torch.zeros((3, self.num_members, self.num_slots), dtype=torch.int64, device=device)
        self.a_offs, self.bt_offs, self.ranks = self.packed.unbind(0)
        self.scales = torch.zeros((self.num_members, self.num_slots), dtype=torch.float32, device=device)
        # CPU: numpy views share the tensors' memory, and a numpy item write is ~100x cheaper.
        self._views = ([t.numpy() for t in (self.a_offs, self.bt_offs, self.ranks, self.scales)]
                       if device.type == "cpu" else None)
        self._targets: list[set[int]] = [set() for _ in range(self.num_members)]
        PoolTable.generation += 1

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    def set(self, member: int, slot: int, a_off: int, bt_off: int, rank: int, scale: float) -> None:
        """Point (member, slot) at an A block at a_off and a Bt block at bt_off, of `rank` rows.
        rank 0 clears the entry (the slot's adapter does not target this member)."""
        if not (0 <= member < self.num_members and 0 <= slot < self.num_slots):
            raise IndexError(f"member {member} / slot {slot} outside {self.num_members} x {self.num_slots}")
        if rank < 0 or (rank and (a_off < 0 or bt_off < 0)):
            raise ValueError(f"rank {rank} at offsets {a_off} / {bt_off}: must be >= 0")
        if not rank:
            a_off = bt_off = 0
            scale = 0.0
        values = (int(a_off), int(bt_off), int(rank), float(scale))
        if self._views is not None:
            for view, value in zip(self._views, values):
                view[member, slot] = value
        else:
            for t, value in zip((self.a_offs, self.bt_offs, self.ranks, self.scales), values):
                t[member, slot] = value
        if rank:
            self._targets[member].add(slot)
        else:
            self._targets[member].discard(slot)
        PoolTable.generation += 1

    def clear(self, slot: int) -> None:
        """Forget the slot's adapter for every member (its pool bytes may be reused at once: no
        kernel reads a member of rank 0)."""
        for m in range(self.num_members):
            self.set(m, slot, 0, 0, 0, 0.0)

    def targets(self, member: int) -> set[int]:
        """Slots whose adapter targets `member` (rank > 0); the live set: do not modify it."""
        return self._targets[member]

    def max_ranks(self) -> torch.Tensor:
        """[slots] int64: each slot's largest rank over the members (for this group alone; the
        manager's meta ranks are the maximum over all of an adapter's modules)."""
        return self.ranks.max(dim=0).values

    def __repr__(self) -> str:
        used = sum(len(t) for t in self._targets)
        return (f"PoolTable(members={self.num_members}, slots={self.num_slots}, d_in={self.d_in}, "
                f"d_outs={self.d_outs}, entries={used}, device={self.device})")
