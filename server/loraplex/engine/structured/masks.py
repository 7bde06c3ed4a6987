"""Per step: which tokens each constrained row may take next, as a bitmask, applied as -inf.

    pending = builder.start(matchers)          # before the forward; None when no row is constrained
    logits = runner.run(...)                   # the masks are computed meanwhile, in a worker
    masks = pending.result()                   # TokenMasks, handed to the sampler
    logits = masks.apply(logits)               # in the sampler, before temperature / top-k / top-p

llguidance fills a row's mask with the GIL released, so the worker overlaps the model's forward
(torch also runs without the GIL). Rows without a constraint are not touched: their logits, and
so their tokens, are exactly what they would be without constrained neighbours.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from loraplex.engine.structured.grammar import Matcher, mask_words

_SHIFTS = torch.arange(32, dtype=torch.int32)  # [32]: bit b of a word is token 32 * word + b


@dataclass(frozen=True)
class TokenMasks:
    rows: torch.Tensor  # [R] int64: which of the sampler's rows are constrained
    bitmask: torch.Tensor  # [R, words] int32: bit t set = token t allowed

    def allowed(self, vocab: int) -> torch.Tensor:
        """[R, vocab] bool."""
        bits = (self.bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # [R, words, 32]
        return bits.reshape(bits.shape[0], -1)[:, :vocab].bool()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [S, V]. Returns a new tensor, disallowed tokens of the constrained rows at -inf
        (a copy: the caller's logits stay the raw model output)."""
        rows = self.rows.to(logits.device)
        allowed = self.allowed(logits.shape[1]).to(logits.device)  # [R, V]
        out = logits.clone()
        out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return out


class PendingMasks:
    def __init__(self, rows: list[int], bitmask: torch.Tensor, work: Future | None):
        self._rows = rows
        self._bitmask = bitmask
        self._work = work

    def result(self) -> TokenMasks:
        if self._work is not None:
            self._work.result()  # re-raises a failure of the worker
        return TokenMasks(torch.tensor(self._rows, dtype=torch.long), self._bitmask)


def _fill(matchers: Seq[Matcher], bitmask: torch.Tensor) -> None:
    row_bytes = bitmask.shape[1] * 4
    base = bitmask.data_ptr()
    for j, m in enumerate(matchers):
        m.fill_mask(base + j * row_bytes, row_bytes)


class MaskBuilder:
    def __init__(self, vocab_size: int, overlap: bool = True):
        self.words = mask_words(vocab_size)
        self.overlap = overlap
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-masks") if overlap else None

    def start(self, matchers: Seq[Matcher | None]) -> PendingMasks | None:
        """matchers: one per sampled row (None = unconstrained). Starts filling the masks."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        live = [matchers[i] for i in rows]
        bitmask = torch.empty(len(rows), self.words, dtype=torch.int32)  # [R, words]
        if self._pool is None:
            _fill(live, bitmask)
            return PendingMasks(rows, bitmask, None)
        return PendingMasks(rows, bitmask, self._pool.submit(_fill, live, bitmask))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
