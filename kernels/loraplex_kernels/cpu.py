"""CPU backend of add_lora: one pass per rank bucket, never a Python loop over adapters.

For each rank bucket of the step (meta.py: at most log2(max_rank) - 2 of them) the bucket's rows
are multiplied by their own slot's A then B, with one of two batched strategies:

* grouped: `torch.nn.functional.grouped_mm`, the rows of one slot forming one group. On CPU it is a
  C++ loop of one matmul per group: ~one small-GEMM start-up per slot (~5 us float32, ~20 us
  bfloat16 on the dev box) plus the real FLOPs. Slot weights are passed uncopied, every slot of
  the pool a group (the bucket's others empty, ~2 us each); only when that costs more than copying
  the bucket's slots together (index_select) are they compacted (`compact_slots`). Best for
  prefill and for float32; needs 16-byte aligned rows (in, out, w multiples of 16 / element size).
* gather: gather each ROW's weights (A[slot[t], :w] -> [R_b, w, in]) and do one bmm. Costs a copy
  of w * (in + out) weights per row but one call whatever the number of adapters: best for
  bfloat16 decode at small hidden sizes, where each slot has one or two rows; also the fallback
  for unaligned shapes.

A bucket with a single slot skips both: two plain GEMMs on that slot's weight views.
The choice is per bucket and per call, by a two-constant cost model (`use_grouped`) on Python ints
only (rows, groups, shapes, dtype): no host sync.
benchmarks/bench_kernels.py measures both against a loop over adapters and the dense alternative.

Rank handling: a bucket multiplies at width w = bucket rank; columns beyond a slot's real rank are
zeroed by the bucket's rank_mask before the expand, so whatever (finite) values A/B hold beyond the
rank are ignored. The per-slot scale is folded into the small [R_b, w] intermediate (computed in float32),
not into the [R_b, out] result. Results are scattered back with one index_add_ into y, so rows with
idx = -1 are never written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .meta import LoraMeta, RankBucket

# Cost model behind the per-bucket choice, constants measured with cold caches on the 2-core dev
# box (benchmarks/bench_kernels.py; the "grouped vs gather" table of results/kernels_cpu.md):
#   grouped ~ groups * (2 * GEMM_START_S + slot_bytes / COPY_BYTES_PER_S)   one GEMM pair per slot
#   gather  ~ rows * 3 * slot_bytes / COPY_BYTES_PER_S    copy (read + write) + bmm read, per row
# bfloat16 GEMMs carry ~20 us of fixed cost each on this CPU (oneDNN), float32 ones ~5 us: so with
# 32 adapters x 1 decode token at hidden 576, gather wins in bfloat16 (1.0 vs 2.8 ms) while in
# float32 the two tie (0.74 ms), and at hidden 4096 grouped wins from 2 rows per slot on.
GEMM_START_S = {2: 20e-6, 4: 5e-6, 8: 5e-6}
COPY_BYTES_PER_S = 5e9  # cold weights through index_select, and through a GEMM
EMPTY_GROUP_S = 2e-6  # grouped_mm's cost per empty group (float32 and bfloat16 alike)
COMPACT: bool | None = None  # force the compaction choice (benchmarks); None = cost model
PREFER_GROUPED: bool | None = None  # force the strategy of add_lora calls (benchmarks); None = cost model


def _aligned(n: int, dtype: torch.dtype) -> bool:
    """grouped_mm wants every row stride a multiple of 16 bytes."""
    return (n * dtype.itemsize) % 16 == 0


def use_grouped(bucket: RankBucket, width: int, d_in: int, d_out: int, dtype: torch.dtype,
                prefer: bool | None = None) -> bool:
    """grouped_mm if the cost model (or `prefer`) says so and its rows are 16-byte aligned."""
    if not all(_aligned(n, dtype) for n in (width, d_in, d_out)):
        return False
    if prefer is not None:
        return prefer
    slot_bytes = width * (d_in + d_out) * dtype.itemsize  # one slot's A and B slices
    start = GEMM_START_S.get(dtype.itemsize, 5e-6)
    grouped = bucket.num_groups * (2 * start + slot_bytes / COPY_BYTES_PER_S)
    gather = bucket.num_rows * 3 * slot_bytes / COPY_BYTES_PER_S
    return grouped <= gather


def compact_slots(bucket: RankBucket, num_slots: int, width: int, d_io: int, dtype: torch.dtype) -> bool:
    """Copy the bucket's slots together, or pass all slots and let the others be empty groups?

    An empty group costs grouped_mm ~EMPTY_GROUP_S (twice: shrink and expand); the copy costs the
    bucket's weight bytes at ~COPY_BYTES_PER_S. Copy only when it is the cheaper of the two.
    """
    if COMPACT is not None:
        return COMPACT
    empty = num_slots - bucket.num_groups
    copy_bytes = bucket.num_groups * width * d_io * dtype.itemsize
    return 2 * empty * EMPTY_GROUP_S > copy_bytes / COPY_BYTES_PER_S


def _strides_aligned(A: torch.Tensor, Bt: torch.Tensor) -> bool:
    """Can grouped_mm read A/Bt's slot matrices in place (e.g. not with a max_rank of 12 in bf16)?"""
    size = A.dtype.itemsize
    return A.stride(2) == 1 and Bt.stride(2) == 1 and all(
        (st * size) % 16 == 0 for st in (A.stride(0), A.stride(1), Bt.stride(0), Bt.stride(1))
    ) and A.data_ptr() % 16 == 0 and Bt.data_ptr() % 16 == 0


def _row_coef(bucket: RankBucket, scales: torch.Tensor, width: int) -> torch.Tensor:
    """Per-row scale [R_b, 1], times the rank mask [R_b, w] when some rank is below the width."""
    coef = scales.index_select(0, bucket.row_slots).unsqueeze(1)  # [R_b, 1] float32
    if bucket.rank_mask is not None:
        coef = coef * bucket.rank_mask[:, :width]  # [R_b, w]
    return coef


def _bucket_delta(xs: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, scales: torch.Tensor,
                  bucket: RankBucket, prefer_grouped: bool | None = None) -> torch.Tensor:
    """The bucket's LoRA delta for its rows. xs: [R_b, in] (rows in sorted order) -> [R_b, out].
    A: [slots, R, in]; Bt: [slots, R, out], B with its rank first (a view, see add_lora_cpu)."""
    width = min(bucket.rank, A.shape[1])
    d_in, d_out = A.shape[2], Bt.shape[2]
    grouped = use_grouped(bucket, width, d_in, d_out, xs.dtype, prefer_grouped)
    coef = _row_coef(bucket, scales, width)  # [R_b, 1] or [R_b, w], float32
    # In-place mul by a float32 coef computes in float32 and rounds once to v's dtype: the scale
    # is applied at full precision without a cast round-trip (fewer ops on the decode path).
    if bucket.num_groups == 1:  # one slot (a lone request, or one adapter): two plain GEMMs on views
        s = bucket.group_slot_ids[0]
        v = (xs @ A[s, :width].T).mul_(coef)  # [R_b, w]
        return v @ Bt[s, :width]  # [R_b, out]
    if grouped:
        if not _strides_aligned(A, Bt) or compact_slots(bucket, A.shape[0], width, d_in + d_out, xs.dtype):
            a = A[:, :width].index_select(0, bucket.group_slots)  # [n_b, w, in]
            bt = Bt[:, :width].index_select(0, bucket.group_slots)  # [n_b, w, out]
            offs = bucket.group_offs
        else:  # every slot is a group (most empty): no copy of the weights at all
            a, bt, offs = A[:, :width], Bt[:, :width], bucket.slot_offs
        v = F.grouped_mm(xs, a.transpose(1, 2), offs=offs).mul_(coef)  # [R_b, w]
        return F.grouped_mm(v, bt, offs=offs)  # [R_b, out]
    # A slot's first w rows of A (and of Bt) are one contiguous block: each row's gather is a
    # plain memcpy (a [out, w] slice of a [out, R] B would be out strided pieces, ~8x slower).
    a = A[:, :width].index_select(0, bucket.row_slots)  # [R_b, w, in]
    bt = Bt[:, :width].index_select(0, bucket.row_slots)  # [R_b, w, out]
    v = torch.bmm(xs.unsqueeze(1), a.transpose(1, 2)).mul_(coef.unsqueeze(1))  # [R_b, 1, w]
    return torch.bmm(v, bt).squeeze(1)  # [R_b, out]


@torch.no_grad()
def add_lora_cpu(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 scales: torch.Tensor, meta: LoraMeta, grouped: bool | None = None) -> None:
    """y [T, out] += LoRA delta of x [T, in] (contract in loraplex_kernels.__init__).

    `grouped` prefers one strategy for every bucket (benchmarks/tests; unaligned shapes still
    gather); None picks per bucket. B [slots, out, R] is read as Bt = B.transpose(1, 2): fastest
    when B is that transpose of a contiguous [slots, R, out] tensor (lora/layers.py stores it so).
    """
    if not meta.has_lora:
        return
    if grouped is None:
        grouped = PREFER_GROUPED
    Bt = B.transpose(1, 2)  # [slots, R, out]
    dtype = A.dtype
    xs = x.index_select(0, meta.sorted_token_ids)  # [R, in], rows sorted by (bucket, slot)
    if xs.dtype != dtype:
        xs = xs.to(dtype)
    parts = [
        _bucket_delta(xs[bk.row_start:bk.row_end], A, Bt, scales, bk, grouped) for bk in meta.buckets
    ]  # [R_b, out] each; buckets are consecutive row ranges of the sorted order
    delta = parts[0] if len(parts) == 1 else torch.cat(parts)  # [R, out]
    if delta.dtype != y.dtype:
        delta = delta.to(y.dtype)
    y.index_add_(0, meta.sorted_token_ids, delta)
