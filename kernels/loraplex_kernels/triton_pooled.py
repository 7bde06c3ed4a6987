"""Triton backend of add_lora_pooled: segmented shrink and expand kernels that find each segment's
weights in the adapter memory pool through the group's PoolTable.

The same segments as triton_shrink_expand.py (LoraMeta: one per active slot, its rows of the
sorted batch); a program owns BLOCK_M rows of one segment and one member, loads that (slot,
member)'s table entry (offset, real rank, scale) and reads its blocks at pool + offset:

    shrink: v[row, m, :r] = scale[m, slot] * x[token(row)] @ A_m,slot.T   A: [r, in] at a_offs[m, slot]
    expand: y_m[token(row)] += v[row, m, :r] @ Bt_m,slot                   Bt: [r, out_m] at bt_offs[m, slot]

One shrink launch covers every member (grid axis 2: member x split-K); the expand is one launch per
member (each has its own output and width). Loads are masked to the member's real rank, so nothing
past its blocks is read; a member of rank 0 returns before any load. BLOCK_R is sized from
meta.max_rank, which must be >= every member rank of an active slot (the manager builds the meta
from each adapter's maximum rank over its modules). Precision as in triton_shrink_expand.py:
float32 accumulation; operands upcast under TRITON_INTERPRET=1 (its bf16 tl.dot is wrong), for
float32 weights and when x and the pool differ in dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .meta import LoraMeta
from .triton_shrink_expand import expand_tile, plan_launch, segment_rows, shrink_tile, store_v


@triton.jit
def _pooled_shrink_kernel(
    x_ptr, pool_ptr, a_offs_ptr, ranks_ptr, scales_ptr, members_ptr, v_ptr,
    tok_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    K, num_slots,
    sx_m, sx_k, sv_m, sv_mem,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    mi = tl.program_id(2) // SPLIT_K  # which of the asked-for members
    pid_k = tl.program_id(2) % SPLIT_K
    length = tl.load(seg_len_ptr + seg)
    m0 = pid_m * BLOCK_M
    if m0 >= length:  # the grid is sized for the longest segment; shorter ones stop early
        return
    entry = tl.load(members_ptr + mi) * num_slots + tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + entry)
    if rank <= 0:  # the slot's adapter does not target this member: read nothing
        return
    rows, row_mask, tok = segment_rows(seg, m0, tok_ptr, seg_start_ptr, length, BLOCK_M)
    # A block [rank, K], row-major, at its table offset
    acc = shrink_tile(x_ptr, pool_ptr + tl.load(a_offs_ptr + entry), tok, row_mask, rank, K, sx_m, sx_k, K, 1,
                      pid_k, BLOCK_M, BLOCK_R, BLOCK_K, SPLIT_K, CAST_FP32, PRECISION)
    store_v(v_ptr + mi * sv_mem, sv_m, rows, row_mask, acc * tl.load(scales_ptr + entry).to(tl.float32),
            BLOCK_R, SPLIT_K)


@triton.jit
def _pooled_expand_kernel(
    v_ptr, pool_ptr, bt_offs_ptr, ranks_ptr, y_ptr,
    tok_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    N, num_slots, member, mi,
    sv_m, sv_mem, sy_m, sy_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    length = tl.load(seg_len_ptr + seg)
    m0 = pid_m * BLOCK_M
    if m0 >= length:
        return
    entry = member * num_slots + tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + entry)
    if rank <= 0:
        return
    rows, row_mask, tok = segment_rows(seg, m0, tok_ptr, seg_start_ptr, length, BLOCK_M)
    # Bt block [rank, N], row-major: B's rank r / output n at r * N + n
    expand_tile(v_ptr + mi * sv_mem, sv_m, pool_ptr + tl.load(bt_offs_ptr + entry), N, 1, y_ptr, sy_m, sy_n,
                rows, row_mask, tok, rank, N, pid_n, BLOCK_N, BLOCK_R, CAST_FP32, PRECISION)


_members_cache: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def add_lora_pooled_triton(ys: list[torch.Tensor], x: torch.Tensor, pool: torch.Tensor, table, meta: LoraMeta,
                           members: tuple[int, ...], split_k: int | None = None) -> None:
    """add_lora_pooled (contract in loraplex_kernels.__init__): one shrink launch for all members,
    one expand launch per member. Launch sizes come from Python ints of the meta: no sync."""
    if not meta.has_lora or not members:
        return
    key = (members, x.device)
    mem = _members_cache.get(key)
    if mem is None:
        mem = _members_cache[key] = torch.tensor(members, dtype=torch.int32, device=x.device)
    K, n_seg, n_mem = table.d_in, meta.num_active_slots, len(members)
    L = plan_launch(meta, x.dtype, pool.dtype, K, n_seg * n_mem, split_k)
    alloc = torch.zeros if L.split_k > 1 else torch.empty
    v = alloc(meta.num_rows, n_mem, L.block_r, dtype=torch.float32, device=x.device)  # [R, M', BLOCK_R]
    seg = (meta.sorted_token_ids, meta.seg_slots, meta.seg_starts, meta.seg_lens)

    _pooled_shrink_kernel[(L.grid_m, n_seg, n_mem * L.split_k)](
        x, pool, table.a_offs, table.ranks, table.scales, mem, v, *seg, K, table.num_slots,
        x.stride(0), x.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=L.block_m, BLOCK_R=L.block_r, BLOCK_K=L.block_k, SPLIT_K=L.split_k,
        CAST_FP32=L.cast_fp32, PRECISION=L.precision,
    )
    for mi, m in enumerate(members):
        y, N = ys[m], table.d_outs[m]
        _pooled_expand_kernel[(L.grid_m, triton.cdiv(N, L.block_n), n_seg)](
            v, pool, table.bt_offs, table.ranks, y, *seg, N, table.num_slots, m, mi,
            v.stride(0), v.stride(1), y.stride(0), y.stride(1),
            BLOCK_M=L.block_m, BLOCK_N=L.block_n, BLOCK_R=L.block_r,
            CAST_FP32=L.cast_fp32, PRECISION=L.precision,
        )
