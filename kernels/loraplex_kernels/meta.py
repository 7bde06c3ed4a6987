"""Per-step LoRA kernel metadata: the batch's tokens grouped by adapter slot, built once per step.

Every LoRA-targeted projection of a step (7 per layer) sees the same token -> slot mapping, so the
sorting, counting and rank bucketing happen once here and every `add_lora` call only reads the
result. Building it does the step's one device -> host copy (segment sizes become Python ints, so
backends size their loops and launch grids without syncing per layer).

Worked example: 4 slots, slot 1 empty, 7 tokens, token 2 runs on the base model only.

    ranks = [8, 0, 16, 4]                 # real rank of each slot's adapter (0 = empty slot)
    idx   = [2, 0, -1, 2, 3, 0, 2]        # slot of each token, -1 = no adapter

Ranks are rounded up to a power-of-two *bucket* (at least MIN_BUCKET_RANK = 8):
slot 0 -> 8, slot 2 -> 16, slot 3 -> 8. Tokens are sorted by (bucket, slot), stably, so tokens of
one slot stay in batch order and all slots of one bucket are adjacent:

    sorted_token_ids = [1, 5, 4, 0, 3, 6]  # R = 6 rows; token 2 is not there at all
    sorted_slots     = [0, 0, 3, 2, 2, 2]
    segments (one per active slot, in that order):
      seg_slots  = [0, 3, 2]
      seg_starts = [0, 2, 3]               # into sorted_token_ids
      seg_lens   = [2, 1, 3]
      seg_ranks  = [8, 4, 16]
    buckets:
      rank 8 : rows 0:3, group_slots [0, 3], group_offs [2, 3]   (ends, relative to the bucket)
               slot_offs [2, 2, 2, 3]                             (the same ends over all 4 slots)
               rank_mask = [[1]*8, [1]*8, [1]*4 + [0]*4]  # slot 3 has rank 4 < bucket width 8
      rank 16: rows 3:6, group_slots [2],    group_offs [3],  slot_offs [0, 0, 3, 3]
               rank_mask None (every rank == 16)
    (slot_offs is built on first use: it is the one field whose size is the number of slots, and
    only torch's grouped matmul over the whole slot tensor reads it.)

Building it costs O(T + active slots) of Python: the tokens are sorted by slot on the device and
only the sorted slots and their ranks come to the host, never a per-slot table.

A backend works bucket by bucket (at most log2(max_rank) - 2 of them, never one per adapter):
slice A[:, :bucket_rank] and B[:, :, :bucket_rank], multiply, then zero the columns the rank_mask
clears so that whatever sits beyond a slot's real rank is ignored. Work per token is therefore
within 2x of its adapter's real rank (8x for ranks below 8, where it is negligible anyway).
Triton reads the segment arrays instead and masks by seg_ranks directly.
"""

from __future__ import annotations

import array
import bisect
from dataclasses import dataclass, field
from functools import cached_property

import torch

# Smallest bucket width. 8 columns keep every row of a bfloat16/float16 [rows, rank] buffer 16-byte
# aligned, which torch's grouped matmul requires; below that the FLOPs do not matter.
MIN_BUCKET_RANK = 8


def bucket_rank(rank: int) -> int:
    """The power-of-two width (>= MIN_BUCKET_RANK) that a slot of this rank is computed at."""
    return max(MIN_BUCKET_RANK, 1 << (rank - 1).bit_length()) if rank > 1 else MIN_BUCKET_RANK


@dataclass(frozen=True)
class _StepRows:
    """The step's sorted rows and segments, which every bucket slices (shared, built once)."""

    sorted_token_ids: torch.Tensor  # [R] int64
    sorted_slots: torch.Tensor  # [R] int64
    seg_slots: torch.Tensor  # [n_act] int64
    seg_ends: torch.Tensor  # [n_act] int64, row end of each segment relative to its bucket
    slot_ranks: torch.Tensor  # [slots] int64
    num_slots: int


@dataclass(frozen=True)
class RankBucket:
    """The active slots whose rank rounds up to `rank`, and their rows of the sorted batch.

    The tensors are views and masks made on first use (and kept): only the torch CPU formulations
    read them, so a step served by the compiled kernel or Triton never pays for them (a few
    microseconds each on CPU, per bucket, per step).
    """

    rank: int  # bucket width (power of two)
    row_start: int  # rows row_start:row_end of the sorted batch
    row_end: int
    seg_start: int  # segments seg_start:seg_end of the meta (one per slot)
    seg_end: int
    group_slot_ids: tuple[int, ...]  # the bucket's slots in row order, on the host
    full: bool  # every slot of the bucket has rank == the bucket width (rank_mask is None)
    step: _StepRows = field(repr=False, compare=False)

    @cached_property
    def token_ids(self) -> torch.Tensor:
        """[R_b] int64, batch row of each sorted row (view of sorted_token_ids)."""
        return self.step.sorted_token_ids[self.row_start:self.row_end]

    @cached_property
    def row_slots(self) -> torch.Tensor:
        """[R_b] int64, slot of each sorted row."""
        return self.step.sorted_slots[self.row_start:self.row_end]

    @cached_property
    def group_slots(self) -> torch.Tensor:
        """[n_b] int64, the bucket's slots in row order."""
        return self.step.seg_slots[self.seg_start:self.seg_end]

    @cached_property
    def group_offs(self) -> torch.Tensor:
        """[n_b] int32, cumulative row ends per slot, relative to row_start (grouped_mm's offsets)."""
        return self.step.seg_ends[self.seg_start:self.seg_end].to(torch.int32)

    @cached_property
    def rank_mask(self) -> torch.Tensor | None:
        """[R_b, rank] bool, column < the row's real rank; None when every rank fills the width."""
        if self.full:
            return None
        row_ranks = self.step.slot_ranks.index_select(0, self.row_slots)  # [R_b]
        return torch.arange(self.rank, device=row_ranks.device)[None, :] < row_ranks[:, None]

    @cached_property
    def slot_offs(self) -> torch.Tensor:
        """[slots] int32: group_offs over ALL slots (the others: empty groups), for grouped_mm over
        the whole slot tensor (cpu.py's "all" mode): the one O(slots) field, in device ops."""
        ends = self.group_offs
        lens = torch.diff(ends, prepend=ends.new_zeros(1))  # [n_b] rows per slot
        counts = torch.zeros(self.step.num_slots, dtype=torch.int32, device=ends.device)
        counts.scatter_(0, self.group_slots, lens)
        return counts.cumsum(0, dtype=torch.int32)

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def num_groups(self) -> int:
        return len(self.group_slot_ids)


@dataclass(frozen=True)
class LoraMeta:
    """Everything `add_lora` needs about one step's token -> slot mapping (see module docstring)."""

    num_tokens: int  # T
    num_slots: int
    has_lora: bool  # False: no row has an adapter, add_lora returns at once
    token_slots: torch.Tensor  # [T] int64, the idx it was built from (-1 = none)
    slot_ranks: torch.Tensor  # [slots] int64, real rank per slot
    max_rank: int  # largest real rank among ACTIVE slots (0 when has_lora is False)
    num_rows: int  # R: rows with an adapter
    sorted_token_ids: torch.Tensor  # [R] int64, batch rows sorted by (bucket, slot)
    sorted_slots: torch.Tensor  # [R] int64
    seg_slots: torch.Tensor  # [n_act] int64, one segment per active slot
    seg_starts: torch.Tensor  # [n_act] int64, into the sorted rows
    seg_lens: torch.Tensor  # [n_act] int64
    seg_ranks: torch.Tensor  # [n_act] int64
    max_seg_len: int  # longest segment (sizes launch grids without a sync)
    buckets: tuple[RankBucket, ...]

    @property
    def num_active_slots(self) -> int:
        return int(self.seg_slots.shape[0])

    @cached_property
    def active_slots(self) -> frozenset[int]:
        """The slots some row uses, on the host: built once per step, then every projection's
        "does any adapter of this step target me" is a set intersection, no device sync."""
        return frozenset(s for b in self.buckets for s in b.group_slot_ids)

    @property
    def device(self) -> torch.device:
        return self.token_slots.device


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """[len(values)] int64 on `device`, through a host buffer (one copy, nothing per element)."""
    if not values:
        return torch.zeros(0, dtype=torch.int64, device=device)
    host = torch.frombuffer(array.array("q", values), dtype=torch.int64)
    return host if device.type == "cpu" else host.to(device)


def _empty_meta(idx: torch.Tensor, ranks: torch.Tensor) -> LoraMeta:
    none = torch.zeros(0, dtype=torch.int64, device=idx.device)
    return LoraMeta(
        num_tokens=int(idx.shape[0]), num_slots=int(ranks.shape[0]), has_lora=False,
        token_slots=idx, slot_ranks=ranks, max_rank=0, num_rows=0,
        sorted_token_ids=none, sorted_slots=none, seg_slots=none, seg_starts=none, seg_lens=none,
        seg_ranks=none, max_seg_len=0, buckets=(),
    )


def build_lora_meta(idx: torch.Tensor, ranks: torch.Tensor) -> LoraMeta:
    """Group the step's tokens by adapter slot. idx: [T] int64 (-1 = none), ranks: [slots] int.

    Does one device -> host copy (of 2T ints: the tokens' slots, sorted, and their ranks); call it
    once per step, not per layer. The Python work is O(T + active slots), not O(slots): a slot is
    only a row of the weight tables, and a server may keep thousands of them mostly idle.
    """
    if idx.dim() != 1 or ranks.dim() != 1:
        raise ValueError(f"idx and ranks must be 1-D, got {tuple(idx.shape)} and {tuple(ranks.shape)}")
    device = idx.device
    idx = idx.to(torch.int64).contiguous()  # contiguous: the compiled CPU kernel reads it raw
    ranks = ranks.to(device=device, dtype=torch.int64).contiguous()
    num_slots, num_tokens = int(ranks.shape[0]), int(idx.shape[0])
    if num_tokens == 0:
        return _empty_meta(idx, ranks)
    # Tokens sorted by slot, stably (batch order within a slot): -1 rows first, then one run per
    # active slot. Its values and each token's rank are the step's one host sync.
    by_slot, perm = torch.sort(idx, stable=True)  # [T] each
    # index_select, not ranks[...]: advanced indexing costs several times more per call on CPU
    tok_ranks = (ranks.index_select(0, by_slot.clamp(0, num_slots - 1)) if num_slots
                 else torch.zeros_like(by_slot))  # [T]
    host = torch.cat([by_slot, tok_ranks]).tolist()
    slots_h, tok_ranks_h = host[:num_tokens], host[num_tokens:]
    if slots_h[0] < -1 or slots_h[-1] >= num_slots:
        raise ValueError(f"idx holds slots outside -1..{num_slots - 1}")
    first = bisect.bisect_left(slots_h, 0)  # rows before it have no adapter
    if first == num_tokens:
        return _empty_meta(idx, ranks)

    # One run per active slot, in slot order: (slot, start in by_slot, length, rank).
    runs = []
    t = first
    while t < num_tokens:
        s, end = slots_h[t], t + 1
        while end < num_tokens and slots_h[end] == s:
            end += 1
        if not tok_ranks_h[t] > 0:
            raise ValueError(f"{end - t} tokens use slot {s}, whose rank is {tok_ranks_h[t]}")
        runs.append((s, t, end - t, tok_ranks_h[t]))
        t = end
    # Segments ordered by (bucket, slot): a stable sort by bucket of runs already in slot order.
    segs = sorted(runs, key=lambda run: bucket_rank(run[3]))
    num_rows = num_tokens - first
    take_h = []  # where each sorted row is in by_slot; empty when by_slot already has that order
    if segs == runs:  # one bucket (or buckets already in slot order): the sort by slot is the order
        sorted_token_ids, sorted_slots = perm[first:], by_slot[first:]  # [R] views
    else:
        take_h = [i for _, start, n, _ in segs for i in range(start, start + n)]

    order = [s for s, _, _, _ in segs]
    lens_h = [n for _, _, n, _ in segs]
    seg_ranks_h = [r for _, _, _, r in segs]
    n_act = len(segs)
    starts_h = [0] * n_act
    for k in range(1, n_act):
        starts_h[k] = starts_h[k - 1] + lens_h[k - 1]
    # Buckets: consecutive segments of one width, with each segment's row end relative to its bucket.
    bounds, rel_ends = [], []
    i = 0
    while i < n_act:
        width = bucket_rank(seg_ranks_h[i])
        j, acc = i, 0
        while j < n_act and bucket_rank(seg_ranks_h[j]) == width:
            acc += lens_h[j]
            rel_ends.append(acc)
            j += 1
        bounds.append((i, j, width))
        i = j

    # Every host-built array in one host -> device copy (torch.tensor(list) costs ~0.2 us per
    # element on CPU; a buffer costs nothing per element); the fields are contiguous rows of it.
    flat = _to_device(order + starts_h + lens_h + seg_ranks_h + rel_ends + take_h, device)
    seg_slots, seg_starts, seg_lens, seg_ranks, seg_ends = flat[:5 * n_act].view(5, n_act).unbind(0)
    if take_h:  # [R], into by_slot
        take = flat[5 * n_act:]
        sorted_token_ids, sorted_slots = perm.index_select(0, take), by_slot.index_select(0, take)

    step = _StepRows(sorted_token_ids, sorted_slots, seg_slots, seg_ends, ranks, num_slots)
    buckets = tuple(
        RankBucket(rank=width, row_start=starts_h[i], row_end=starts_h[j - 1] + lens_h[j - 1],
                   seg_start=i, seg_end=j, group_slot_ids=tuple(order[i:j]),
                   full=all(r == width for r in seg_ranks_h[i:j]), step=step)
        for i, j, width in bounds
    )

    return LoraMeta(
        num_tokens=num_tokens, num_slots=num_slots, has_lora=True,
        token_slots=idx, slot_ranks=ranks, max_rank=max(seg_ranks_h), num_rows=num_rows,
        sorted_token_ids=sorted_token_ids, sorted_slots=sorted_slots,
        seg_slots=seg_slots, seg_starts=seg_starts, seg_lens=seg_lens, seg_ranks=seg_ranks,
        max_seg_len=max(lens_h), buckets=buckets,
    )
