"""Triton backend of add_lora: a segmented shrink kernel and a segmented expand kernel.

Both kernels read the step's LoraMeta segments (one per active slot: its rows of the sorted batch,
its slot and its real rank). A program owns BLOCK_M rows of one segment, so it loads its slot's
A/B tile once and uses it for all those rows; the grid is sized from Python ints of the meta
(num active slots, longest segment), so launching never syncs with the device.

    shrink: v[row, :] = scale[slot] * x[token(row)] @ A[slot, :rank].T    # [R, BLOCK_R] float32
    expand: y[token(row)] += v[row, :rank] @ B[slot, :, :rank].T           # in place, y's dtype

Rank: loads of A/B are masked to each segment's real rank, so memory traffic follows the real rank
and values beyond it are never read (the dot itself is padded to BLOCK_R >= 16, the minimum tl.dot
shape). Precision: products accumulate in float32; float32 inputs use IEEE dots (no TF32); under
TRITON_INTERPRET=1 bf16/fp16 operands are upcast first because the interpreter's low-precision
tl.dot is wrong. Each row belongs to exactly one segment, so the expand's read-add-write of y needs
no atomics; rows with idx = -1 are in no segment and never touched.

Slices: y (and x) may be strided views, e.g. the q columns of a fused qkv output, so fused
projections can call add_lora once per slice on views without copies. A single launch covering
several slices (vLLM's "slices") is not implemented: the model calls one Projection at a time.

Split-K: when the shrink grid is small (few segments, short ones: decode with few adapters) and the
input is wide, the K loop is split over SPLIT_K programs that atomically add into a zeroed v, so
a 4096-wide shrink is not serialised into one program.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .meta import LoraMeta


# Tile helpers shared with triton_pooled.py (inlined into each kernel): the kernels differ only in
# where a segment's weights start and where its rank and scale come from.

@triton.jit
def segment_rows(seg, m0, tok_ptr, seg_start_ptr, length, BLOCK_M: tl.constexpr):
    """Rows m0..m0 + BLOCK_M of segment `seg` (of `length` rows): sorted-row index, mask, batch row."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_mask = offs_m < length
    rows = tl.load(seg_start_ptr + seg) + offs_m  # rows of the sorted batch
    tok = tl.load(tok_ptr + rows, mask=row_mask, other=0)  # batch row of each sorted row
    return rows, row_mask, tok


@triton.jit
def shrink_tile(x_ptr, a_base, tok, row_mask, rank, K, sx_m, sx_k, sa_r, sa_k, pid_k,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_R] float32: x[tok] @ A.T over split pid_k of K, A's rank r / column k at
    a_base + r * sa_r + k * sa_k, loads masked to r < rank (nothing past it is read)."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_begin + k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + tok[:, None] * sx_m + offs_k[None, :] * sx_k,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        at = tl.load(a_base + offs_r[None, :] * sa_r + offs_k[:, None] * sa_k,
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [BK, BR] = A.T tile
        if CAST_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=PRECISION)
    return acc


@triton.jit
def store_v(v_base, sv_m, rows, row_mask, acc, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr):
    """v[rows, :BLOCK_R] = acc, or += across the K splits (atomically; v was zeroed)."""
    v_ptrs = v_base + rows[:, None] * sv_m + tl.arange(0, BLOCK_R)[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc, mask=row_mask[:, None])
    else:
        tl.atomic_add(v_ptrs, acc, mask=row_mask[:, None])


@triton.jit
def expand_tile(v_base, sv_m, b_base, sb_r, sb_n, y_ptr, sy_m, sy_n, rows, row_mask, tok, rank, N, pid_n,
                BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """y[tok, tile pid_n] += v[rows, :rank] @ B.T tile, B's rank r / output n at b_base + r * sb_r
    + n * sb_n (masked to r < rank), summed in float32, stored in y's dtype."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    vt = tl.load(v_base + rows[:, None] * sv_m + offs_r[None, :],
                 mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # [BM, BR] float32
    bt = tl.load(b_base + offs_n[None, :] * sb_n + offs_r[:, None] * sb_r,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BR, BN] = B.T tile
    if CAST_FP32:
        bt = bt.to(tl.float32)
    else:
        vt = vt.to(bt.dtype)  # bf16 x bf16 -> float32 accumulate on the tensor cores
    delta = tl.dot(vt, bt, input_precision=PRECISION)  # [BM, BN] float32
    y_ptrs = y_ptr + tok[:, None] * sy_m + offs_n[None, :] * sy_n
    mask = row_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yt.to(tl.float32) + delta).to(yt.dtype), mask=mask)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, scale_ptr, v_ptr,
    tok_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr, seg_rank_ptr,
    K,
    sx_m, sx_k, sa_s, sa_r, sa_k, sv_m,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_k = tl.program_id(2)
    length = tl.load(seg_len_ptr + seg)
    m0 = pid_m * BLOCK_M
    if m0 >= length:  # the grid is sized for the longest segment; shorter ones stop early
        return
    slot = tl.load(seg_slot_ptr + seg)
    rows, row_mask, tok = segment_rows(seg, m0, tok_ptr, seg_start_ptr, length, BLOCK_M)
    acc = shrink_tile(x_ptr, a_ptr + slot * sa_s, tok, row_mask, tl.load(seg_rank_ptr + seg), K,
                      sx_m, sx_k, sa_r, sa_k, pid_k, BLOCK_M, BLOCK_R, BLOCK_K, SPLIT_K, CAST_FP32, PRECISION)
    store_v(v_ptr, sv_m, rows, row_mask, acc * tl.load(scale_ptr + slot).to(tl.float32), BLOCK_R, SPLIT_K)


@triton.jit
def _expand_kernel(
    v_ptr, b_ptr, y_ptr,
    tok_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr, seg_rank_ptr,
    N,
    sv_m, sb_s, sb_n, sb_r, sy_m, sy_n,
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
    slot = tl.load(seg_slot_ptr + seg)
    rows, row_mask, tok = segment_rows(seg, m0, tok_ptr, seg_start_ptr, length, BLOCK_M)
    expand_tile(v_ptr, sv_m, b_ptr + slot * sb_s, sb_r, sb_n, y_ptr, sy_m, sy_n, rows, row_mask, tok,
                tl.load(seg_rank_ptr + seg), N, pid_n, BLOCK_N, BLOCK_R, CAST_FP32, PRECISION)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


def pick_split_k(num_programs: int, k: int, block_k: int) -> int:
    """Split the K loop when too few programs would otherwise each walk a long K (decode)."""
    if num_programs >= 64:
        return 1
    return max(1, min(8, k // (4 * block_k)))


class Launch(NamedTuple):
    """Block sizes and precision of one step's shrink/expand launches (Python ints of the meta)."""

    cast_fp32: bool
    precision: str | None
    block_m: int
    block_r: int
    block_k: int
    block_n: int
    grid_m: int
    split_k: int


def plan_launch(meta: LoraMeta, x_dtype: torch.dtype, w_dtype: torch.dtype, K: int, shrink_programs: int,
                split_k: int | None) -> Launch:
    """shrink_programs: programs per row block of the shrink grid without split-K (segments, times
    the members for the pooled kernels)."""
    # Upcast operands in the interpreter (its bf16 dot is wrong), for float32 weights, and when x
    # and A differ in dtype (tl.dot wants one operand dtype); IEEE keeps float32 dots off TF32.
    cast_fp32 = _interpreting() or w_dtype == torch.float32 or x_dtype != w_dtype
    block_r = _pow2_at_least(meta.max_rank, 16)
    block_m = 16 if meta.max_seg_len <= 16 else (32 if meta.max_seg_len <= 32 else 64)
    block_k = 32 if _interpreting() else 128
    block_n = 32 if _interpreting() else (64 if block_r > 32 else 128)
    grid_m = triton.cdiv(meta.max_seg_len, block_m)
    if split_k is None:
        split_k = pick_split_k(grid_m * shrink_programs, K, block_k)
    return Launch(cast_fp32, "ieee" if cast_fp32 else None, block_m, block_r, block_k, block_n, grid_m, split_k)


@torch.no_grad()
def add_lora_triton(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    scales: torch.Tensor, meta: LoraMeta, split_k: int | None = None) -> None:
    """y [T, out] += LoRA delta of x [T, in] (contract in loraplex_kernels.__init__)."""
    if not meta.has_lora:
        return
    K, N, n_seg = x.shape[1], y.shape[1], meta.num_active_slots
    L = plan_launch(meta, x.dtype, A.dtype, K, n_seg, split_k)
    alloc = torch.zeros if L.split_k > 1 else torch.empty
    v = alloc(meta.num_rows, L.block_r, dtype=torch.float32, device=x.device)  # [R, BLOCK_R]
    seg = (meta.sorted_token_ids, meta.seg_slots, meta.seg_starts, meta.seg_lens, meta.seg_ranks)

    _shrink_kernel[(L.grid_m, n_seg, L.split_k)](
        x, A, scales, v, *seg, K,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), v.stride(0),
        BLOCK_M=L.block_m, BLOCK_R=L.block_r, BLOCK_K=L.block_k, SPLIT_K=L.split_k,
        CAST_FP32=L.cast_fp32, PRECISION=L.precision,
    )
    _expand_kernel[(L.grid_m, triton.cdiv(N, L.block_n), n_seg)](
        v, B, y, *seg, N,
        v.stride(0), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=L.block_m, BLOCK_N=L.block_n, BLOCK_R=L.block_r,
        CAST_FP32=L.cast_fp32, PRECISION=L.precision,
    )
