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

from . import lora_native, native as native_build
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
NATIVE: bool | None = None  # force the compiled kernel on/off (benchmarks, tests); None = use it when built


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


def _strides_aligned(*mats: torch.Tensor) -> bool:
    """Can grouped_mm read these [slots, rows, cols] matrices in place (e.g. not with a max_rank
    of 12 in bf16)? Last dim contiguous, other strides and the base 16-byte aligned."""
    size = mats[0].dtype.itemsize
    return all(m.stride(2) == 1 and (m.stride(0) * size) % 16 == 0 and (m.stride(1) * size) % 16 == 0
               and m.data_ptr() % 16 == 0 for m in mats)


def _row_coef(bucket: RankBucket, scales: torch.Tensor, width: int) -> torch.Tensor:
    """Per-row, per-member scale [R_b, 1, M] (scales: [slots, M]), times the rank mask
    ([R_b, w, M]) when some rank is below the width. One gather for all members."""
    coef = scales.index_select(0, bucket.row_slots).unsqueeze(1)  # [R_b, 1, M] float32
    if bucket.rank_mask is not None:
        coef = coef * bucket.rank_mask[:, :width, None]  # [R_b, w, M]
    return coef


class _Weights:
    """How one bucket reads its slots' weights: one slot's views, all slots in place, the
    bucket's slots compacted, or one copy per row (see the module docstring)."""

    def __init__(self, bucket: RankBucket, mode: str):
        self.bucket, self.mode = bucket, mode

    def take(self, W: torch.Tensor) -> torch.Tensor:
        """W [slots, k, n] -> the bucket's operand: [k, n] (single), [slots | n_b | R_b, k, n]."""
        bk = self.bucket
        if self.mode == "single":
            return W[bk.group_slot_ids[0]]
        if self.mode == "all":
            return W
        return W.index_select(0, bk.group_slots if self.mode == "compact" else bk.row_slots)

    def mm(self, v: torch.Tensor, W: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Every row of v [R_b, k] times its own slot's W [slots, k, n] -> [R_b, n]; with
        `transposed`, W is [slots, n, k] and its transpose is used (gathered first, then viewed
        transposed: a gather of the transposed view would be a strided copy)."""
        w = self.take(W)
        if transposed:
            w = w.transpose(-2, -1)
        if self.mode == "single":
            return v @ w
        if self.mode == "rows":
            return torch.bmm(v.unsqueeze(1), w).squeeze(1)
        offs = self.bucket.slot_offs if self.mode == "all" else self.bucket.group_offs
        return F.grouped_mm(v, w, offs=offs)


def _mode(bucket: RankBucket, width: int, d_in: int, d_outs: list[int], dtype: torch.dtype,
          num_slots: int, aligned: bool, prefer_grouped: bool | None, member_width: int) -> str:
    if bucket.num_groups == 1:  # one slot (a lone request, or one adapter): plain GEMMs on views
        return "single"
    # grouped_mm wants 16-byte rows in every operand: each member's [R_b, w] expand input too
    # (a max_lora_rank of 6 gives w = 6 while the shrink's M * w = 12 is aligned).
    if not all(_aligned(n, dtype) for n in (member_width, *d_outs)):
        return "rows"
    if not use_grouped(bucket, width, d_in, sum(d_outs), dtype, prefer_grouped):
        return "rows"
    if not aligned or compact_slots(bucket, num_slots, width, d_in + sum(d_outs), dtype):
        return "compact"
    return "all"  # every slot is a group (most of them empty): no copy of the weights at all


def _bucket_deltas(xs: torch.Tensor, A: torch.Tensor, Bts: list[torch.Tensor], scales: torch.Tensor,
                   members: tuple[int, ...], bucket: RankBucket, prefer_grouped: bool | None
                   ) -> list[torch.Tensor]:
    """One bucket's LoRA deltas for its rows, per member: xs [R_b, in] (sorted rows) ->
    [R_b, out_m] for m in members. A [slots, R, M, in] (rank-interleaved, see add_lora_multi_cpu),
    Bts[m] [slots, R, out_m], scales [slots, M]."""
    num_slots, max_rank, num_members, d_in = A.shape
    width = min(bucket.rank, max_rank)
    # The first `width` ranks of every member are one contiguous block per slot: a view.
    a = A[:, :width].reshape(num_slots, width * num_members, d_in)  # [slots, w*M, in]
    bts = [Bts[m][:, :width] for m in members]  # [slots, w, out_m] each
    d_outs = [bt.shape[2] for bt in bts]
    mode = _mode(bucket, width * num_members, d_in, d_outs, xs.dtype, num_slots,
                 _strides_aligned(a, *bts), prefer_grouped, width)
    how = _Weights(bucket, mode)
    v = how.mm(xs, a, transposed=True)  # [R_b, w*M]: row t's x times its slot's A, all members
    # Scales (and the rank mask) for every member at once, in float32 (type promotion).
    v = v.view(-1, width, num_members) * _row_coef(bucket, scales, width)  # [R_b, w, M]
    out = []
    for m, bt in zip(members, bts):
        vm = v[:, :, m].to(xs.dtype).contiguous()  # [R_b, w]: the expand's operand (no-op for M = 1)
        out.append(how.mm(vm, bt))  # [R_b, out_m]
    return out


@torch.no_grad()
def add_lora_multi_cpu(ys: list[torch.Tensor], x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                       scales: torch.Tensor, meta: LoraMeta, members: tuple[int, ...] | None = None,
                       grouped: bool | None = None, native: bool | None = None) -> None:
    """ys[m] [T, out_m] += LoRA delta of member m for x [T, in], for M projections of one x
    (q/k/v, gate/up) in one pass: one shrink for all members, then one expand per member.

    The compiled per-row kernel (lora_native.py) runs it when it is built and takes the operands
    (fp32/bf16 weights and activations) unless `native` (or NATIVE) is False or a torch
    strategy is forced with `grouped`; native=True insists on it.

    A [slots, R, M, in]: member m's A is A[:, :, m] (ranks interleaved, so that the first w ranks
    of all members are contiguous); Bs[m] [slots, out_m, R]; scales [slots, M]. `members`: the
    members to compute (default all; others are left alone).
    """
    if not meta.has_lora:
        return
    if grouped is None:
        grouped = PREFER_GROUPED
    members = tuple(range(A.shape[2])) if members is None else members
    if not members:
        return
    Bts = [B.transpose(1, 2) for B in Bs]  # [slots, R, out_m] each
    if native is None:
        native = NATIVE
    if native is None and grouped is not None:
        native = False  # a torch strategy was asked for
    if native is None and not lora_native.worth_it(meta, A.shape[3]):
        native = False  # long segments on wide projections: torch's grouped GEMM is faster
    chosen_bts, chosen_ys = [Bts[m] for m in members], [ys[m] for m in members]
    if native is not False and lora_native.weights_fit(A, chosen_bts, scales, members) \
            and lora_native.activations_fit(x, chosen_ys):
        call = lora_native.prepare(A, chosen_bts, scales, members)
        call(chosen_ys, x, meta.sorted_token_ids, meta.token_slots, meta.slot_ranks)
        return
    if native:
        raise RuntimeError(f"the native LoRA kernel cannot run here: {native_build.unavailable_reason() or 'operands'}")
    xs = x.index_select(0, meta.sorted_token_ids)  # [R, in], rows sorted by (bucket, slot)
    if xs.dtype != A.dtype:
        xs = xs.to(A.dtype)
    parts = [
        _bucket_deltas(xs[bk.row_start:bk.row_end], A, Bts, scales, members, bk, grouped)
        for bk in meta.buckets
    ]  # per bucket, per member [R_b, out_m]; buckets are consecutive row ranges of the sorted order
    for i, m in enumerate(members):
        delta = parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts])  # [R, out_m]
        if delta.dtype != ys[m].dtype:
            delta = delta.to(ys[m].dtype)
        ys[m].index_add_(0, meta.sorted_token_ids, delta)


def add_lora_cpu(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 scales: torch.Tensor, meta: LoraMeta, grouped: bool | None = None,
                 native: bool | None = None) -> None:
    """y [T, out] += LoRA delta of x [T, in] (contract in loraplex_kernels.__init__).

    `grouped` prefers one strategy for every bucket (benchmarks/tests; unaligned shapes still
    gather); None picks per bucket. B [slots, out, R] is read as Bt = B.transpose(1, 2): fastest
    when B is that transpose of a contiguous [slots, R, out] tensor (lora/layers.py stores it so).
    The one-member case of add_lora_multi_cpu.
    """
    add_lora_multi_cpu([y], x, A.unsqueeze(2), [B], scales.unsqueeze(1), meta, grouped=grouped, native=native)
