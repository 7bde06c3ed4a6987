"""CPU backend of add_lora_pooled: the compiled kernel when it is there, else torch, vectorised.

The compiled kernel (lora_rows.c, loraplex_lora_pooled) reads each row's blocks in place through
the table. Without a C compiler (or with LORAPLEX_NATIVE_KERNELS=0) the torch formulation below
runs instead: per rank bucket of the meta (meta.py: at most log2(max_rank) - 2 of them), never a
Python loop over adapters or slots.

Gathering a block out of the pool: `pool.unfold(0, d_in, 1)` is a view whose row i is
pool[i:i + d_in], so rank k of a member's A block (offset o) is row o + k * d_in of it, and one
index_select of [G * M * w] row numbers copies G blocks of M members at bucket width w into a
[G, M * w, d_in] operand (Bt alike, per member, with d_out). Row numbers beyond a member's real
rank are clamped to its last real row (a rank-0 member reads row 0), so nothing outside the
adapter's own bytes is ever addressed; the columns they produce are zeroed by the per-row
coefficient (scale * (k < rank)) before the expand, so whatever they hold cannot leak into y.

G is chosen per bucket as in cpu.py: one slot ("single": G = 1, plain matmuls), the bucket's
slots with torch's grouped matmul ("grouped": G = slots, when the cost model prefers it and rows
are 16-byte aligned: prefill), or one block per row ("rows": G = rows, one bmm: decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu, lora_native, native as native_build
from .meta import LoraMeta, RankBucket

_members_cache: dict[tuple, torch.Tensor] = {}


def members_tensor(members: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[M'] int64 of the member ids, made once per (members, device)."""
    key = (members, device)
    t = _members_cache.get(key)
    if t is None:
        t = _members_cache[key] = torch.tensor(members, dtype=torch.int64, device=device)
    return t


def block_rows(off: torch.Tensor, rank: torch.Tensor, width: int, row_len: int) -> torch.Tensor:
    """[..., width] unfold-row numbers of ranks 0..width-1 of the blocks at `off` [...] with
    `rank` [...] rows of `row_len` elements; past the rank, the last real row again (rank 0: row 0)."""
    k = torch.arange(width, device=off.device)
    last = (rank - 1).clamp(min=0).unsqueeze(-1)  # [..., 1]
    base = torch.where(rank > 0, off, 0).unsqueeze(-1)
    return base + torch.minimum(k, last) * row_len


def _gather(rows_view: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows [G, n] unfold-row numbers -> [G, n, row_len] copied out of the pool."""
    g, n = rows.shape
    return rows_view.index_select(0, rows.reshape(-1)).view(g, n, rows_view.shape[1])


def _mode(bucket: RankBucket, width: int, num_members: int, d_in: int, d_outs: list[int],
          dtype: torch.dtype, prefer_grouped: bool | None) -> str:
    if bucket.num_groups == 1:
        return "single"
    if not all(cpu._aligned(n, dtype) for n in (width, d_in, *d_outs)):
        return "rows"
    grouped = cpu.use_grouped(bucket, width * num_members, d_in, sum(d_outs), dtype, prefer_grouped)
    return "grouped" if grouped else "rows"


def _bucket_deltas(xs: torch.Tensor, pool: torch.Tensor, table, mem: torch.Tensor, members: tuple[int, ...],
                   row_entries: torch.Tensor, row_scales: torch.Tensor, bucket: RankBucket,
                   prefer_grouped: bool | None) -> list[torch.Tensor]:
    """One bucket's deltas per member: xs [R_b, in] -> [R_b, out_m]. row_entries [3, M', R_b]
    (a_off, bt_off, rank of each row's slot per member), row_scales [M', R_b]."""
    width, d_in, n_mem = bucket.rank, table.d_in, len(members)
    d_outs = [table.d_outs[m] for m in members]
    mode = _mode(bucket, width, n_mem, d_in, d_outs, pool.dtype, prefer_grouped)
    if mode == "rows":
        entries = row_entries  # one block per row
    else:  # one block per slot of the bucket
        entries = table.packed.index_select(1, mem).index_select(2, bucket.group_slots)  # [3, M', G]
    a_off, bt_off, rank = entries.unbind(0)  # [M', G] each

    # Shrink, all members at once: [G, M' * w, in] blocks (member-major), v [R_b, M' * w].
    a_rows = block_rows(a_off, rank, width, d_in).transpose(0, 1).reshape(-1, n_mem * width)  # [G, M' * w]
    a = _gather(pool.unfold(0, d_in, 1), a_rows)
    if mode == "single":
        v = xs @ a[0].T
    elif mode == "rows":
        v = torch.bmm(a, xs.unsqueeze(2)).squeeze(2)
    else:
        v = F.grouped_mm(xs, a.transpose(1, 2), offs=bucket.group_offs)
    # Scale and rank mask per row and member, in float32: columns past a member's rank become 0.
    row_rank = row_entries[2]  # [M', R_b]
    keep = torch.arange(width, device=xs.device) < row_rank.unsqueeze(-1)  # [M', R_b, w]
    coef = (row_scales.unsqueeze(-1) * keep).transpose(0, 1)  # [R_b, M', w]
    v = (v.view(-1, n_mem, width) * coef).to(pool.dtype)

    out = []
    for i, d_out in enumerate(d_outs):
        bt = _gather(pool.unfold(0, d_out, 1), block_rows(bt_off[i], rank[i], width, d_out))  # [G, w, out]
        vm = v[:, i].contiguous()  # [R_b, w]
        if mode == "single":
            out.append(vm @ bt[0])
        elif mode == "rows":
            out.append(torch.bmm(vm.unsqueeze(1), bt).squeeze(1))
        else:
            out.append(F.grouped_mm(vm, bt, offs=bucket.group_offs))
    return out


@torch.no_grad()
def add_lora_pooled_torch(ys: list[torch.Tensor], x: torch.Tensor, pool: torch.Tensor, table, meta: LoraMeta,
                          members: tuple[int, ...], grouped: bool | None = None) -> None:
    """add_lora_pooled (contract in loraplex_kernels.__init__) in torch ops: see the module docstring."""
    if not meta.has_lora:
        return
    # Members no active slot targets cost nothing (a host-side check on Python sets, no sync).
    members = tuple(m for m in members if not table.targets(m).isdisjoint(meta.active_slots))
    if not members:
        return
    if pool.numel() < max(table.d_in, *(table.d_outs[m] for m in members)):
        raise ValueError(f"a pool of {pool.numel()} elements cannot hold one row of {table.d_in} / {table.d_outs}")
    mem = members_tensor(members, pool.device)
    xs = x.index_select(0, meta.sorted_token_ids)  # [R, in], rows sorted by (bucket, slot)
    if xs.dtype != pool.dtype:
        xs = xs.to(pool.dtype)
    entries = table.packed.index_select(1, mem).index_select(2, meta.sorted_slots)  # [3, M', R]
    scales = table.scales.index_select(0, mem).index_select(1, meta.sorted_slots)  # [M', R]
    parts = []
    for bk in meta.buckets:
        rows = slice(bk.row_start, bk.row_end)
        parts.append(_bucket_deltas(xs[rows], pool, table, mem, members, entries[:, :, rows], scales[:, rows],
                                    bk, grouped))
    for i, m in enumerate(members):
        delta = parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts])  # [R, out_m]
        ys[m].index_add_(0, meta.sorted_token_ids, delta.to(ys[m].dtype))


def add_lora_pooled_cpu(ys: list[torch.Tensor], x: torch.Tensor, pool: torch.Tensor, table, meta: LoraMeta,
                        members: tuple[int, ...], native: bool | None = None, grouped: bool | None = None) -> None:
    """The compiled kernel when it is built and takes the operands (unless `native`, or cpu.NATIVE,
    is False; native=True insists on it), else add_lora_pooled_torch."""
    if not meta.has_lora or not members:
        return
    if native is None:
        native = cpu.NATIVE
    if native is None and grouped is not None:
        native = False  # a torch strategy was asked for
    chosen = [ys[m] for m in members]
    if native is not False and lora_native.pool_fits(pool, table, members) and lora_native.activations_fit(x, chosen):
        prepare_pooled(pool, table, members)(chosen, x, meta.sorted_token_ids, meta.token_slots)
        return
    if native:
        raise RuntimeError(f"the native pooled LoRA kernel cannot run here: "
                           f"{native_build.unavailable_reason() or 'operands'}")
    add_lora_pooled_torch(ys, x, pool, table, meta, members, grouped)


_prepared: dict[tuple, lora_native.PreparedPool] = {}


def prepare_pooled(pool: torch.Tensor, table, members: tuple[int, ...]) -> lora_native.PreparedPool:
    """The PreparedPool for this pool, table and member set, cached (keyed by the pool's address,
    size and dtype and the table object: the table's tensors never move)."""
    key = (pool.data_ptr(), pool.numel(), pool.dtype, id(table), members)
    call = _prepared.get(key)
    if call is None or call._keep[1] is not table:
        if len(_prepared) >= 1024:  # tests make many pools; the server one per group and member set
            _prepared.clear()
        call = _prepared[key] = lora_native.PreparedPool(pool, table, members)
    return call
