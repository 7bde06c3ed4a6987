"""Per step: which tokens each constrained row may take next, as a bitmask, applied as -inf.

    pending = builder.start(matchers)          # before the forward; None when no row is constrained
    logits = runner.run(...)                   # the masks are computed meanwhile, in a worker
    masks = pending.result()                   # TokenMasks, handed to the sampler
    logits = masks.apply(logits)               # in the sampler, before temperature / top-k / top-p

llguidance fills a row's mask with the GIL released, and the worker also unpacks the bits into a
[R, vocab] bool tensor, so all that overlaps the model's forward (torch also runs without the
GIL); what is left on the critical path is one masked_fill. Rows without a constraint are not touched: their logits, and
so their tokens, are exactly what they would be without constrained neighbours.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence as Seq

import torch
from loraplex_kernels import openmp_pool

from loraplex.engine.structured.grammar import Matcher, mask_words

# [256, 8] bool: the bits of each byte value, lowest first (token 8 * byte + bit).
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, words] int32 bitmask (bit t of the row = token t allowed) -> [R, vocab] bool. A table
    lookup per byte: ~10x cheaper than shifting every int32 by 0..31."""
    as_bytes = bitmask.contiguous().view(torch.uint8).long()  # [R, 4 * words], little-endian bytes
    return _BYTE_BITS[as_bytes].reshape(bitmask.shape[0], -1)[:, :vocab]


@dataclass(frozen=True)
class TokenMasks:
    rows: torch.Tensor  # [R] int64: which of the sampler's rows are constrained
    allowed: torch.Tensor  # [R, V] bool: token allowed next

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [S, V]. Returns a new tensor, disallowed tokens of the constrained rows at -inf
        (never written into the caller's logits, which stay the raw model output)."""
        allowed = self.allowed.to(logits.device)
        if len(self.rows) == logits.shape[0]:  # every row constrained (rows are 0..S-1 in order)
            return logits.masked_fill(~allowed, float("-inf"))
        rows = self.rows.to(logits.device)
        out = logits.clone()
        out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return out


class PendingMasks:
    def __init__(self, rows: list[int], work: Future | torch.Tensor):
        self._rows = rows
        self._work = work  # the worker's future of the [R, V] allowed tensor, or the tensor

    def result(self) -> TokenMasks:
        allowed = self._work.result() if isinstance(self._work, Future) else self._work
        return TokenMasks(torch.tensor(self._rows, dtype=torch.long), allowed)


def _fill(matchers: Seq[Matcher], words: int, vocab: int) -> torch.Tensor:
    """The [R, vocab] allowed tensor of the matchers' next tokens."""
    bitmask = torch.empty(len(matchers), words, dtype=torch.int32)  # [R, words]
    row_bytes = words * 4
    base = bitmask.data_ptr()
    for j, m in enumerate(matchers):
        m.fill_mask(base + j * row_bytes, row_bytes)
    return unpack_bitmask(bitmask, vocab)


class MaskBuilder:
    def __init__(self, vocab_size: int, overlap: bool = True):
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self.overlap = overlap
        # The worker's own torch ops (the unpacking) stay on one core: OpenMP pools are per OS
        # thread, and a default-sized pool here would fight the forward's for the same cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-masks",
                                        initializer=openmp_pool.one_thread) if overlap else None

    def start(self, matchers: Seq[Matcher | None]) -> PendingMasks | None:
        """matchers: one per sampled row (None = unconstrained). Starts filling the masks."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        live = [matchers[i] for i in rows]
        if self._pool is None:
            return PendingMasks(rows, _fill(live, self.words, self.vocab_size))
        return PendingMasks(rows, self._pool.submit(_fill, live, self.words, self.vocab_size))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
