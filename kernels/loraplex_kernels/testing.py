"""Random add_lora problems and their float64 answers, shared by the tests and the benchmarks.

Punica-style sweeps: adapter popularity (distinct, uniform, zipf, identical), odd batch sizes,
mixed ranks, rows without an adapter, prefill segments next to decode tokens. Data is random and
never zero; A/B hold large garbage beyond each slot's rank (and in unused slots), so a backend
that does not slice to the real rank is visibly wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .meta import LoraMeta, build_lora_meta
from .reference import add_lora_reference

POPULARITIES = ("distinct", "uniform", "zipf", "identical")
GARBAGE = 1e3  # magnitude of the values beyond each rank: finite, and far too big to go unnoticed

# Max |y - expected| / max |expected delta| a backend may show, per dtype of its operands.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class LoraCase:
    idx: torch.Tensor  # [T] int64, -1 = no adapter
    ranks: torch.Tensor  # [slots] int32
    x: torch.Tensor  # [T, in]
    y0: torch.Tensor  # [T, out], random "base output" the delta is added to
    A: torch.Tensor  # [slots, max_rank, in], garbage beyond each rank
    B: torch.Tensor  # [slots, out, max_rank], garbage beyond each rank
    scales: torch.Tensor  # [slots] float32

    def meta(self) -> LoraMeta:
        return build_lora_meta(self.idx, self.ranks)

    def to(self, device) -> "LoraCase":
        return LoraCase(*(t.to(device) for t in (self.idx, self.ranks, self.x, self.y0, self.A, self.B, self.scales)))


def draw_slots(n: int, num_adapters: int, popularity: str, g: torch.Generator) -> torch.Tensor:
    """n adapter ids in [0, num_adapters) with the given popularity."""
    if popularity == "distinct":  # every item its own adapter (cycling once they run out)
        ids = torch.arange(n) % num_adapters
        return torch.randperm(num_adapters, generator=g)[ids][torch.randperm(n, generator=g)]
    if popularity == "uniform":
        return torch.randint(num_adapters, (n,), generator=g)
    if popularity == "zipf":  # p(k) ~ 1 / (k + 1)^1.5: a few hot adapters and a long tail
        p = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, n, replacement=True, generator=g)
    if popularity == "identical":
        return torch.full((n,), int(torch.randint(num_adapters, (1,), generator=g)))
    raise ValueError(f"unknown popularity {popularity!r}")


def make_idx(num_tokens: int, num_adapters: int, popularity: str, g: torch.Generator,
             none_frac: float = 0.2, prefill: bool = False) -> torch.Tensor:
    """[T] slot per token. prefill=True lays the batch out as sequences: a few prefill chunks
    (one slot each, contiguous) followed by single decode tokens, like the runner's flat batch."""
    if not prefill:
        idx = draw_slots(num_tokens, num_adapters, popularity, g)
        none = torch.rand(num_tokens, generator=g) < none_frac
    else:
        lens = []
        left = num_tokens
        while left > 0:
            n = 1 if (len(lens) % 3 == 2 or left < 4) else int(torch.randint(2, max(3, left // 2 + 1), (1,), generator=g))
            n = min(n, left)
            lens.append(n)
            left -= n
        seq_slots = draw_slots(len(lens), num_adapters, popularity, g)
        seq_none = torch.rand(len(lens), generator=g) < none_frac
        counts = torch.tensor(lens)
        idx = torch.repeat_interleave(seq_slots, counts)
        none = torch.repeat_interleave(seq_none, counts)
    none[0] = False  # at least one row with an adapter, or the case tests nothing
    return torch.where(none, -1, idx).to(torch.int64)


def make_ranks(num_adapters: int, max_rank: int, mode: str, g: torch.Generator) -> torch.Tensor:
    if mode == "mixed":  # anything in 1..max_rank, several per bucket
        return torch.randint(1, max_rank + 1, (num_adapters,), generator=g).to(torch.int32)
    if mode == "pow2":
        choices = torch.tensor([r for r in (4, 8, 16, 32, 64, 128) if r <= max_rank])
        return choices[torch.randint(len(choices), (num_adapters,), generator=g)].to(torch.int32)
    return torch.full((num_adapters,), int(mode), dtype=torch.int32)


def make_case(num_tokens: int, d_in: int, d_out: int, num_adapters: int, popularity: str = "uniform",
              rank_mode: str = "mixed", max_rank: int = 64, dtype: torch.dtype = torch.float32,
              weight_dtype: torch.dtype | None = None, seed: int = 0, none_frac: float = 0.2,
              prefill: bool = False, garbage: float = GARBAGE, extra_slots: int = 2) -> LoraCase:
    """A random problem. The pool has `extra_slots` unused slots (rank 0, all garbage) as well."""
    g = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype
    slots = num_adapters + extra_slots
    ranks = torch.zeros(slots, dtype=torch.int32)
    ranks[:num_adapters] = make_ranks(num_adapters, max_rank, rank_mode, g)
    idx = make_idx(num_tokens, num_adapters, popularity, g, none_frac, prefill)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    A = randn(slots, max_rank, d_in) * garbage
    B = randn(slots, d_out, max_rank) * garbage
    for s in range(num_adapters):  # scaled so every delta is O(1) whatever the shape
        r = int(ranks[s])
        A[s, :r] = randn(r, d_in) / d_in ** 0.5
        B[s, :, :r] = randn(d_out, r) / r ** 0.5
    return LoraCase(
        idx=idx, ranks=ranks,
        x=randn(num_tokens, d_in).to(dtype), y0=randn(num_tokens, d_out).to(dtype),
        A=A.to(weight_dtype), B=B.to(weight_dtype),
        scales=(0.25 + 1.75 * torch.rand(slots, generator=g)).to(torch.float32),
    )


def expected(case: LoraCase) -> torch.Tensor:
    """[T, out] float64: y0 plus the reference delta, computed entirely in float64."""
    y = case.y0.double().clone()
    add_lora_reference(y, case.x.double(), case.A.double(), case.B.double(), case.scales,
                       build_lora_meta(case.idx.cpu(), case.ranks.cpu()))
    return y


def compare(y: torch.Tensor, case: LoraCase, want: torch.Tensor) -> dict:
    """err: max |y - want| relative to the largest delta; untouched: idx=-1 rows bit-identical."""
    y, y0, idx = y.cpu(), case.y0.cpu(), case.idx.cpu()
    delta = (want - y0.double()).abs().max().item()
    err = (y.double() - want).abs().max().item() / max(delta, 1e-30)
    return {"err": err, "untouched": bool(torch.equal(y[idx < 0], y0[idx < 0])), "delta": delta}


# --- the pooled op (add_lora_pooled): adapters placed in one flat pool full of garbage ----------

RANK_CHOICES = (1, 3, 8, 13, 16, 64)


@dataclass
class PooledCase:
    """A random add_lora_pooled problem. `weights[s][m]` is (A [r, in], Bt [r, out], scale) of the
    adapter in slot s for member m, as stored in the pool (float64 copies), or None (rank 0)."""

    idx: torch.Tensor  # [T] int64, -1 = no adapter
    slot_ranks: torch.Tensor  # [slots] int32: each adapter's largest member rank, 0 = empty slot
    x: torch.Tensor  # [T, in]
    y0s: list[torch.Tensor]  # [T, out_m] per member
    pool: torch.Tensor  # [P] flat
    table: object  # PoolTable
    weights: dict[int, list[tuple | None]]

    def meta(self) -> LoraMeta:
        return build_lora_meta(self.idx, self.slot_ranks)


class _Arena:
    """First fit at a random place inside a random free region that is big enough: blocks land at
    scattered, unordered offsets; freed blocks are reused by later placements."""

    def __init__(self, size: int, g: torch.Generator):
        self.free, self.g = [(0, size)], g

    def alloc(self, n: int) -> int:
        fits = [i for i, (_, length) in enumerate(self.free) if length >= n]
        if not fits:
            raise MemoryError(f"test pool full ({n} elements)")
        i = fits[int(torch.randint(len(fits), (1,), generator=self.g))]
        off, length = self.free.pop(i)
        at = off + int(torch.randint(length - n + 1, (1,), generator=self.g))
        self.free += [(o, l) for o, l in ((off, at - off), (at + n, off + length - at - n)) if l > 0]
        return at

    def release(self, off: int, n: int) -> None:
        self.free.append((off, n))


def _adapter_ranks(num_members: int, g: torch.Generator, rank_choices=RANK_CHOICES, zero_frac: float = 0.25,
                   equal_frac: float = 0.4) -> list[int]:
    """Per-member ranks of one adapter: sometimes all equal (the fused layout), some members 0
    (not targeted), at least one member > 0."""
    pick = lambda: rank_choices[int(torch.randint(len(rank_choices), (1,), generator=g))]  # noqa: E731
    if float(torch.rand(1, generator=g)) < equal_frac:
        return [pick()] * num_members
    ranks = [0 if float(torch.rand(1, generator=g)) < zero_frac else pick() for _ in range(num_members)]
    if not any(ranks):
        ranks[int(torch.randint(num_members, (1,), generator=g))] = pick()
    return ranks


def make_pooled_case(num_tokens: int, d_in: int, d_outs: tuple[int, ...], num_adapters: int,
                     popularity: str = "uniform", dtype: torch.dtype = torch.float32,
                     weight_dtype: torch.dtype | None = None, seed: int = 0, none_frac: float = 0.2,
                     prefill: bool = False, layout: str = "fragmented", rank_choices=RANK_CHOICES,
                     extra_slots: int = 3, replace: int = 2, garbage: float = GARBAGE) -> PooledCase:
    """Adapters in slots 0..num_adapters-1 (the rest empty), their blocks in a pool pre-filled
    with random garbage. layout "packed": adapter after adapter, each adapter's A blocks adjacent
    (member-major) then its Bt blocks; "fragmented": every block (or an adapter's A blocks
    together, when their ranks are equal) at a random place, then `replace` slots cleared and
    given new adapters placed where memory is free (partly in the freed bytes)."""
    from .pool_table import PoolTable

    g = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype
    num_members = len(d_outs)
    slots = num_adapters + extra_slots
    idx = make_idx(num_tokens, num_adapters, popularity, g, none_frac, prefill)
    adapters = {s: _adapter_ranks(num_members, g, rank_choices) for s in range(num_adapters)}

    def block_sizes(ranks):
        return [r * d_in for r in ranks], [r * d for r, d in zip(ranks, d_outs)]

    need = sum(sum(a) + sum(b) for a, b in (block_sizes(r) for r in adapters.values()))
    size = 3 * need + 4 * (d_in + max(d_outs)) + 64  # room for the re-placed adapters and gaps
    pool64 = torch.randn(size, generator=g, dtype=torch.float64) * garbage
    table = PoolTable(num_members, slots, d_in, d_outs)
    weights: dict[int, list[tuple | None]] = {}
    arena = _Arena(size, g)
    cursor = [int(torch.randint(64, (1,), generator=g))]  # "packed": next free offset

    def alloc(n):
        if layout == "packed":
            at = cursor[0]
            cursor[0] += n
            return at
        return arena.alloc(n)

    def place(s, ranks):
        a_sizes, b_sizes = block_sizes(ranks)
        fused = len(set(ranks)) == 1 and (layout == "packed" or float(torch.rand(1, generator=g)) < 0.5)
        a_offs = [None] * num_members
        if fused:  # member-major A blocks, adjacent: [M * r, in] in one piece
            at = alloc(sum(a_sizes))
            for m in range(num_members):
                a_offs[m] = at + m * a_sizes[0]
        entries = []
        for m, r in enumerate(ranks):
            if r == 0:
                entries.append(None)
                continue
            a_off = a_offs[m] if fused else alloc(a_sizes[m])
            A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
            entries.append((m, r, a_off, A))
        placed = []
        for e in entries:
            if e is None:
                placed.append(None)
                continue
            m, r, a_off, A = e
            bt_off = alloc(b_sizes[m])
            Bt = torch.randn(r, d_outs[m], generator=g, dtype=torch.float64) / r ** 0.5
            scale = 0.25 + 1.75 * float(torch.rand(1, generator=g))
            pool64[a_off:a_off + A.numel()] = A.flatten()
            pool64[bt_off:bt_off + Bt.numel()] = Bt.flatten()
            placed.append((a_off, bt_off, r, scale))
        return placed

    placements = {s: place(s, ranks) for s, ranks in adapters.items()}
    if layout == "fragmented" and replace:
        for s in torch.randperm(num_adapters, generator=g)[:replace].tolist():
            table.clear(s)
            for p, r in zip(placements[s], adapters[s]):
                if p is not None:
                    arena.release(p[0], r * d_in)
            adapters[s] = _adapter_ranks(num_members, g, rank_choices)
            placements[s] = place(s, adapters[s])
    pool = pool64.to(weight_dtype)
    stored = pool.double()  # the weights as the kernels see them (rounded to the pool's dtype)
    for s, placed in placements.items():
        weights[s] = []
        for m, p in enumerate(placed):
            if p is None:
                weights[s].append(None)
                continue
            a_off, bt_off, r, scale = p
            table.set(m, s, a_off, bt_off, r, scale)
            weights[s].append((stored[a_off:a_off + r * d_in].view(r, d_in),
                               stored[bt_off:bt_off + r * d_outs[m]].view(r, d_outs[m]), float(table.scales[m, s])))
    slot_ranks = torch.zeros(slots, dtype=torch.int32)
    for s, ranks in adapters.items():
        slot_ranks[s] = max(ranks)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return PooledCase(idx=idx, slot_ranks=slot_ranks, x=randn(num_tokens, d_in).to(dtype),
                      y0s=[randn(num_tokens, d).to(dtype) for d in d_outs], pool=pool, table=table, weights=weights)


def pooled_expected(case: PooledCase, members: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """[T, out_m] float64 per member: y0 plus the delta, from the adapters' own weights (not through
    the pool table), in float64: the plain-torch oracle. Members not asked for: y0."""
    members = tuple(range(len(case.y0s))) if members is None else members
    ys = [y.double().clone() for y in case.y0s]
    x = case.x.double()
    for t, s in enumerate(case.idx.tolist()):
        if s < 0:
            continue
        for m in members:
            w = case.weights[s][m]
            if w is not None:
                A, Bt, scale = w
                ys[m][t] += scale * ((x[t] @ A.T) @ Bt)
    return ys


def pooled_compare(ys: list[torch.Tensor], case: PooledCase, want: list[torch.Tensor],
                   members: tuple[int, ...] | None = None) -> dict:
    """Worst err over the members asked for (relative to each one's largest delta); untouched:
    rows with idx = -1, and members not asked for, bit-identical to y0."""
    members = tuple(range(len(case.y0s))) if members is None else members
    idx = case.idx.cpu()
    err, untouched = 0.0, True
    for m, (y, y0, w) in enumerate(zip(ys, case.y0s, want)):
        y, y0 = y.cpu(), y0.cpu()
        if m not in members:
            untouched &= bool(torch.equal(y, y0))
            continue
        untouched &= bool(torch.equal(y[idx < 0], y0[idx < 0]))
        delta = (w - y0.double()).abs().max().item()
        if delta > 0:
            err = max(err, (y.double() - w).abs().max().item() / delta)
        else:
            untouched &= bool(torch.equal(y, y0))
    return {"err": err, "untouched": untouched}
