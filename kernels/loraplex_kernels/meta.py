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

A backend works bucket by bucket (at most log2(max_rank) - 2 of them, never one per adapter):
slice A[:, :bucket_rank] and B[:, :, :bucket_rank], multiply, then zero the columns the rank_mask
clears so that whatever sits beyond a slot's real rank is ignored. Work per token is therefore
within 2x of its adapter's real rank (8x for ranks below 8, where it is negligible anyway).
Triton reads the segment arrays instead and masks by seg_ranks directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest bucket width. 8 columns keep every row of a bfloat16/float16 [rows, rank] buffer 16-byte
# aligned, which torch's grouped matmul requires; below that the FLOPs do not matter.
MIN_BUCKET_RANK = 8


def bucket_rank(rank: int) -> int:
    """The power-of-two width (>= MIN_BUCKET_RANK) that a slot of this rank is computed at."""
    width = MIN_BUCKET_RANK
    while width < rank:
        width *= 2
    return width


@dataclass(frozen=True)
class RankBucket:
    """The active slots whose rank rounds up to `rank`, and their rows of the sorted batch."""

    rank: int  # bucket width (power of two)
    row_start: int  # rows row_start:row_end of the sorted batch
    row_end: int
    token_ids: torch.Tensor  # [R_b] int64, batch row of each sorted row (view of sorted_token_ids)
    row_slots: torch.Tensor  # [R_b] int64, slot of each sorted row
    group_slots: torch.Tensor  # [n_b] int64, the bucket's slots in row order
    group_slot_ids: tuple[int, ...]  # the same on the host (a one-slot bucket needs no gather)
    group_offs: torch.Tensor  # [n_b] int32, cumulative row ends per slot, relative to row_start
    slot_offs: torch.Tensor  # [slots] int32, the same ends over ALL slots (others: empty groups)
    rank_mask: torch.Tensor | None  # [R_b, rank] bool, column < real rank; None if all full

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def num_groups(self) -> int:
        return int(self.group_slots.shape[0])


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

    @property
    def device(self) -> torch.device:
        return self.token_slots.device


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

    Does one device -> host copy (segment sizes and ranks); call it once per step, not per layer.
    """
    if idx.dim() != 1 or ranks.dim() != 1:
        raise ValueError(f"idx and ranks must be 1-D, got {tuple(idx.shape)} and {tuple(ranks.shape)}")
    device = idx.device
    idx = idx.to(torch.int64).contiguous()  # contiguous: the compiled CPU kernel reads it raw
    ranks = ranks.to(device=device, dtype=torch.int64).contiguous()
    num_slots = int(ranks.shape[0])
    active = idx >= 0  # [T]
    # Token count per slot without a sync of its own (no boolean indexing, no bincount): bin 0
    # catches idx < -1, bin 1 counts idx = -1, bin s + 2 slot s, the last bin slots beyond the pool.
    bins = idx.clamp(-2, num_slots) + 2  # [T] in 0..num_slots + 2
    counts = torch.zeros(num_slots + 3, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    # The one host sync of the step: per-slot token counts and ranks together.
    host = torch.cat([counts, ranks]).tolist()
    counts_h, ranks_h = host[2:num_slots + 2], host[num_slots + 3:]
    if host[0] or host[num_slots + 2]:
        raise ValueError(f"idx holds slots outside -1..{num_slots - 1}")
    if sum(counts_h) == 0:
        return _empty_meta(idx, ranks)
    for s, c in enumerate(counts_h):
        if c and not ranks_h[s] > 0:
            raise ValueError(f"{c} tokens use slot {s}, whose rank is {ranks_h[s]}")

    # Order active slots by (bucket, slot) and give each slot its position in that order.
    order = sorted((s for s in range(num_slots) if counts_h[s]), key=lambda s: (bucket_rank(ranks_h[s]), s))
    position = [0] * num_slots
    for p, s in enumerate(order):
        position[s] = p
    pos_t = torch.tensor(position, dtype=torch.int64, device=device)  # [slots]
    # Inactive rows sort last (key = len(order)); a stable sort keeps batch order within a slot.
    key = torch.where(active, pos_t[idx.clamp(min=0)], len(order))  # [T]
    perm = torch.sort(key, stable=True).indices  # [T]
    num_rows = sum(counts_h)
    sorted_token_ids = perm[:num_rows].contiguous()  # [R]
    sorted_slots = idx[sorted_token_ids]  # [R]

    lens_h = [counts_h[s] for s in order]
    starts_h = [0]
    for n in lens_h[:-1]:
        starts_h.append(starts_h[-1] + n)
    seg_ranks_h = [ranks_h[s] for s in order]

    def dev(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    buckets = []
    i = 0
    while i < len(order):
        width = bucket_rank(seg_ranks_h[i])
        j = i
        while j < len(order) and bucket_rank(seg_ranks_h[j]) == width:
            j += 1
        row_start, row_end = starts_h[i], starts_h[j - 1] + lens_h[j - 1]
        ends, acc = [], 0
        for n in lens_h[i:j]:
            acc += n
            ends.append(acc)
        # Within a bucket slots come in increasing slot order, so ends over all slots are a running
        # count of this bucket's rows per slot (slots outside the bucket contribute none).
        in_bucket = dict(zip(order[i:j], lens_h[i:j]))
        slot_ends, acc = [], 0
        for s in range(num_slots):
            acc += in_bucket.get(s, 0)
            slot_ends.append(acc)
        row_slots = sorted_slots[row_start:row_end]
        rank_mask = None
        if any(r != width for r in seg_ranks_h[i:j]):
            row_ranks = ranks[row_slots]  # [R_b]
            rank_mask = torch.arange(width, device=device)[None, :] < row_ranks[:, None]  # [R_b, width]
        buckets.append(RankBucket(
            rank=width, row_start=row_start, row_end=row_end,
            token_ids=sorted_token_ids[row_start:row_end], row_slots=row_slots,
            group_slots=dev(order[i:j]), group_slot_ids=tuple(order[i:j]), group_offs=dev(ends, torch.int32),
            slot_offs=dev(slot_ends, torch.int32), rank_mask=rank_mask,
        ))
        i = j

    return LoraMeta(
        num_tokens=int(idx.shape[0]), num_slots=num_slots, has_lora=True,
        token_slots=idx, slot_ranks=ranks, max_rank=max(seg_ranks_h), num_rows=num_rows,
        sorted_token_ids=sorted_token_ids, sorted_slots=sorted_slots,
        seg_slots=dev(order), seg_starts=dev(starts_h), seg_lens=dev(lens_h), seg_ranks=dev(seg_ranks_h),
        max_seg_len=max(lens_h), buckets=tuple(buckets),
    )
