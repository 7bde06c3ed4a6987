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
