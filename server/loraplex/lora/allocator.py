"""Extents of the adapter memory pool: which element ranges are taken, and what to evict for room.

The pool (lora/pool.py) is one flat tensor; every resident adapter holds ONE contiguous extent of
exactly its own size (real ranks, targeted modules only), so memory follows real rank as with
S-LoRA's unified paging, while the kernels find each adapter through a per-slot offset table.

The price of variable-size extents is fragmentation: free memory may be split into holes that are
each too small. Instead of compacting (which would move weights under running kernels), eviction
picks a *window*: a run of address-adjacent holes and evictable extents whose span fits the new
adapter, choosing the window whose most recently used victim is the oldest (then: fewest bytes
evicted). With every extent evictable this is at least as good as plain LRU at freeing a fitting
hole, and extents in use (running sequences, pins, loads in progress) are never touched.

Pure bookkeeping on Python ints: no tensors, no locks (the manager holds its lock around calls).

Worked example, capacity 100, extents a=[0,30) b=[30,50) c=[70,100), hole [50,70):
    alloc(15)  -> 50 (best-fitting hole)
    alloc(40)  -> None; plan(40, lru={a: 5, b: 9, c: 1}) -> window [50,100) = hole + c: evict [c]
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable

# Extent starts and sizes are multiples of this many elements (64 bytes of bfloat16): rows the
# kernels stream start on a cache line, and every block stays 16-byte aligned for SIMD loads.
ALIGN_ELEMS = 32


def aligned(n: int) -> int:
    return -(-n // ALIGN_ELEMS) * ALIGN_ELEMS


@dataclass(frozen=True)
class EvictionPlan:
    offset: int  # where the new extent will start once the victims are gone
    victims: tuple[Hashable, ...]  # owners of the extents to evict (empty: a hole fits already)


class ExtentAllocator:
    def __init__(self, capacity: int):
        if capacity < ALIGN_ELEMS:
            raise ValueError(f"capacity: at least {ALIGN_ELEMS} elements, got {capacity}")
        self.capacity = capacity - capacity % ALIGN_ELEMS
        self._starts: list[int] = []  # sorted extent starts
        self._ext: dict[int, tuple[int, Hashable]] = {}  # start -> (size, owner)
        self.used = 0

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._starts)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def extents(self) -> list[tuple[int, int, Hashable]]:
        """(start, size, owner) in address order."""
        return [(s, *self._ext[s]) for s in self._starts]

    def holes(self) -> list[tuple[int, int]]:
        """(start, size) of every free range, in address order."""
        out, pos = [], 0
        for s in self._starts:
            if s > pos:
                out.append((pos, s - pos))
            pos = s + self._ext[s][0]
        if pos < self.capacity:
            out.append((pos, self.capacity - pos))
        return out

    # ------------------------------------------------------------------ changes
    def alloc(self, size: int, owner: Hashable) -> int | None:
        """Start of a new extent of `size` elements in the best-fitting hole, or None."""
        size = aligned(size)
        best = None
        for start, n in self.holes():
            if n >= size and (best is None or n < best[1]):
                best = (start, n)
        if best is None:
            return None
        self.take(best[0], size, owner)
        return best[0]

    def take(self, start: int, size: int, owner: Hashable) -> None:
        """Mark [start, start + size) taken (it must be free: see `plan`)."""
        size = aligned(size)
        i = bisect.bisect_left(self._starts, start)
        prev_end = 0 if i == 0 else self._starts[i - 1] + self._ext[self._starts[i - 1]][0]
        next_start = self._starts[i] if i < len(self._starts) else self.capacity
        if start % ALIGN_ELEMS or start < prev_end or start + size > next_start:
            raise ValueError(f"[{start}, {start + size}) is not free")
        self._starts.insert(i, start)
        self._ext[start] = (size, owner)
        self.used += size

    def release(self, start: int) -> None:
        size, _ = self._ext.pop(start)
        self._starts.pop(bisect.bisect_left(self._starts, start))
        self.used -= size

    # ------------------------------------------------------------------ eviction
    def plan(self, size: int, age: Callable[[Hashable], float | None]) -> EvictionPlan | None:
        """Where `size` elements can go and which extents must be evicted first, or None if no
        window of free and evictable space fits. `age(owner)` is the owner's last use (smaller =
        older) or None when it may not be evicted."""
        size = aligned(size)
        if size > self.capacity:
            return None
        # Regions covering [0, capacity) in address order: (start, end, key, owner); key None for
        # an extent that may not move (it splits the pool into independent runs), -inf for a hole.
        regions: list[tuple[int, int, float | None, Hashable]] = []
        pos = 0
        for s in self._starts:
            n, owner = self._ext[s]
            if s > pos:
                regions.append((pos, s, float("-inf"), None))
            regions.append((s, s + n, age(owner), owner))
            pos = s + n
        if pos < self.capacity:
            regions.append((pos, self.capacity, float("-inf"), None))
        best: tuple[float, int, int, int] | None = None  # (newest victim, victim bytes, i, j)
        i = 0
        window: deque[int] = deque()  # region indices of the window, keys decreasing (max at [0])
        j = 0  # regions i..j-1 are in the window
        victim_bytes = 0
        while i < len(regions):
            if regions[i][2] is None:  # a fixed extent: no window crosses it
                i += 1
                j = max(j, i)
                window.clear()
                victim_bytes = 0
                continue
            while j < len(regions) and regions[j][2] is not None and regions[j][0] - regions[i][0] < size:
                while window and regions[window[-1]][2] <= regions[j][2]:
                    window.pop()
                window.append(j)
                if regions[j][3] is not None:
                    victim_bytes += regions[j][1] - regions[j][0]
                j += 1
            span = (regions[j - 1][1] if j > i else regions[i][0]) - regions[i][0]
            if span >= size and j > i:
                newest = regions[window[0]][2]
                key = (newest, victim_bytes, i, j)
                if best is None or key[:2] < best[:2]:
                    best = key
            if j == i:  # region i alone blocked the extension (fixed): skip past it
                i += 1
                j = i
                continue
            # slide: drop region i
            if window and window[0] == i:
                window.popleft()
            if regions[i][3] is not None:
                victim_bytes -= regions[i][1] - regions[i][0]
            i += 1
            if j < i:
                j = i
                window.clear()
                victim_bytes = 0
        if best is None:
            return None
        _, _, i, j = best
        victims = tuple(r[3] for r in regions[i:j] if r[3] is not None)
        return EvictionPlan(offset=regions[i][0], victims=victims)
