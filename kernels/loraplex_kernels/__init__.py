"""Batched multi-LoRA kernels: one call applies every adapter of a mixed batch.

    meta = build_lora_meta(idx, ranks)        # once per step (the step's one host sync)
    add_lora(y, x, A, B, scales, meta)        # per LoRA-targeted projection, in place
    set_backend("cpu" | "triton" | "reference")  # once at start-up; get_backend() reports it
    op = BoundLora(A, Bs, scales); op(ys, x, meta, members)  # add_lora_multi on fixed slot weights
    add_lora_pooled(ys, x, pool, table, meta, members)  # weights found in one flat pool via a PoolTable
    op = BoundPooled(pool, table); op(ys, x, meta, members)  # the same, bound to a pool and table
"""

from __future__ import annotations

import torch

from .bound import BoundLora, BoundPooled
from .backend import BACKENDS, current_impl, default_backend, get_backend, set_backend, slot_weight_dtype
from .meta import LoraMeta, RankBucket, build_lora_meta
from .pool_table import PoolTable

__all__ = [
    "BACKENDS", "BoundLora", "BoundPooled", "LoraMeta", "PoolTable", "RankBucket", "add_lora", "add_lora_multi",
    "add_lora_pooled", "build_lora_meta", "default_backend", "get_backend", "set_backend", "slot_weight_dtype",
]


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             scales: torch.Tensor, meta: LoraMeta) -> None:
    """Add every token's own LoRA delta to y, in place, for all adapters of the batch at once.

    Semantics:
        # T tokens, slots adapter slots, R = max_rank (rows of A beyond a slot's rank are ignored)
        # y:      [T, out]            x: [T, in]           (same dtype; y may be a column-slice view)
        # A:      [slots, R, in]      B: [slots, out, R]   (x's dtype, or float32 with a bf16 model)
        # scales: [slots] float32     meta = build_lora_meta(idx [T] int64, ranks [slots] int)
        for t in range(T):
            s = idx[t]
            if s < 0:
                continue                         # base-model row: y[t] is not touched
            r = ranks[s]
            y[t] += scales[s] * (x[t] @ A[s, :r, :].T) @ B[s, :, :r].T

    No work at all when no row has an adapter. Values of A/B beyond a slot's rank may be anything
    finite (they are masked out, not multiplied by zero-padding you must provide). Computation is in
    A's dtype with float32 accumulation where the backend allows (see each backend's module).
    """
    if not meta.has_lora:  # no-LoRA fast path: one attribute read
        return
    _check(y, x, A, B, scales, meta)
    current_impl()(y, x, A, B, scales, meta)


def _check(y, x, A, B, scales, meta) -> None:
    T = meta.num_tokens
    if x.shape[0] != T or y.shape[0] != T:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not have the meta's {T} rows")
    slots, max_rank, d_in = A.shape
    if x.shape[1] != d_in or B.shape != (slots, y.shape[1], max_rank):
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if slots != meta.num_slots or scales.shape != (slots,):
        raise ValueError(f"A has {slots} slots, meta {meta.num_slots}, scales {tuple(scales.shape)}")
    if meta.max_rank > max_rank:
        raise ValueError(f"an active slot has rank {meta.max_rank} > A's max_rank {max_rank}")


def add_lora_multi(ys: list[torch.Tensor], x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                   scales: torch.Tensor, meta: LoraMeta, members: tuple[int, ...] | None = None) -> None:
    """add_lora for M projections that read the same x (q/k/v, gate/up), in one pass where the
    backend fuses it:

        # A: [slots, R, M, in]  member m's A is A[:, :, m] (ranks interleaved: the first w ranks
        #                       of every member are one contiguous block per slot)
        # Bs[m]: [slots, out_m, R]   ys[m]: [T, out_m]   scales: [slots, M] float32
        for m in members (default: all):
            add_lora(ys[m], x, A[:, :, m], Bs[m], scales[:, m], meta)

    The CPU backend shrinks x once against all members' A (one matmul of width M * w instead of
    M of width w) and expands per member; other backends run the loop above.
    """
    if not meta.has_lora:
        return
    members = tuple(range(A.shape[2])) if members is None else members
    if A.dim() != 4 or len(ys) != A.shape[2] or len(Bs) != A.shape[2] or scales.shape != (A.shape[0], A.shape[2]):
        raise ValueError(f"A {tuple(A.shape)} must be [slots, R, M, in] with M = len(ys) = len(Bs) = "
                         f"{len(ys)}/{len(Bs)}, scales {tuple(scales.shape)} [slots, M]")
    if get_backend() != "cpu":
        for m in members:
            add_lora(ys[m], x, A[:, :, m], Bs[m], scales[:, m], meta)
        return
    from .cpu import add_lora_multi_cpu

    for m in members:  # the single op's shape checks, per member (cheap: no data is touched)
        _check(ys[m], x, A[:, :, m], Bs[m], scales[:, m], meta)
    add_lora_multi_cpu(ys, x, A, Bs, scales, meta, members)


def add_lora_pooled(ys: list[torch.Tensor], x: torch.Tensor, pool: torch.Tensor, table: PoolTable,
                    meta: LoraMeta, members: tuple[int, ...] | None = None) -> None:
    """add_lora_multi with every adapter's weights in one flat memory pool, found through `table`.

    Semantics:
        # T tokens, M = table.num_members projections reading the same x (q/k/v: 3, gate/up: 2)
        # x: [T, d_in]   ys[m]: [T, d_outs[m]] (x's dtype; may be column views of a fused output)
        # pool: [P] flat, the slot weight dtype (slot_weight_dtype); table: PoolTable [M, slots]
        # meta = build_lora_meta(idx [T], slot_ranks [slots]), slot_ranks[s] = the adapter's
        #        largest rank over all its modules (0 = empty slot): sorting and sizing only
        for t in range(T):
            s = idx[t]                               # meta.token_slots
            if s < 0:
                continue                             # rows without adapter are never written
            for m in members:                        # default: all M
                r = table.ranks[m, s]
                if r == 0:
                    continue                         # the adapter does not target member m
                d_in, d_out = table.d_in, table.d_outs[m]
                A  = pool[a_offs[m, s] : a_offs[m, s] + r * d_in].view(r, d_in)
                Bt = pool[bt_offs[m, s] : bt_offs[m, s] + r * d_out].view(r, d_out)
                ys[m][t] += scales[m, s] * (x[t] @ A.T) @ Bt

    Nothing past a member's r rows is read (the pool bytes after an adapter's blocks belong to
    another one), and table.ranks[m, s] <= slot_ranks[s] must hold. Work follows each member's
    real rank; one call serves every adapter of the step; sums in float32 (float64 on the
    reference backend). Backends: "reference" (reference.py), "cpu" (cpu_pooled.py: the compiled
    kernel, else torch), "triton" (triton_pooled.py).
    """
    if not meta.has_lora:  # no-LoRA fast path
        return
    members = tuple(range(table.num_members)) if members is None else tuple(members)
    if not members:
        return
    _check_pooled(ys, x, pool, table, meta, members)
    backend = get_backend()
    if backend == "reference":
        from .reference import add_lora_pooled_reference as impl
    elif backend == "triton":
        from .triton_pooled import add_lora_pooled_triton as impl
    else:
        from .cpu_pooled import add_lora_pooled_cpu as impl
    impl(ys, x, pool, table, meta, members)


def _check_pooled(ys, x, pool, table, meta, members) -> None:
    T = meta.num_tokens
    if pool.dim() != 1:
        raise ValueError(f"the pool must be 1-D, got {tuple(pool.shape)}")
    if meta.num_slots != table.num_slots:
        raise ValueError(f"meta for {meta.num_slots} slots, table has {table.num_slots}")
    if len(ys) != table.num_members or any(not 0 <= m < table.num_members for m in members):
        raise ValueError(f"ys has {len(ys)} outputs and members {members}; the table {table.num_members} members")
    if x.shape != (T, table.d_in):
        raise ValueError(f"x {tuple(x.shape)} is not [{T}, {table.d_in}]")
    for m in members:
        if ys[m].shape != (T, table.d_outs[m]):
            raise ValueError(f"ys[{m}] {tuple(ys[m].shape)} is not [{T}, {table.d_outs[m]}]")
