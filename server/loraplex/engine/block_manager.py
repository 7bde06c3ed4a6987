"""Paged KV-cache bookkeeping: which fixed-size block belongs to which sequence.

The cache (model/kv_cache.py) is `num_blocks` blocks of `block_size` token slots. A sequence owns
an ordered list of blocks (`Sequence.block_table`); token at position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Blocks are handed out as a sequence
grows (a prefill chunk or a decode token at a time) and all returned when it finishes, is aborted
or is preempted. No prefix sharing: every block has exactly one owner, so a free list suffices.
"""

from __future__ import annotations

from collections import deque

from loraplex.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO reuse spreads writes over the cache; any order would be correct.
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs so that its next `num_new_tokens` tokens have a slot."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(cdiv(total, self.block_size) - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def max_tokens_allocatable(self, seq: Sequence) -> int:
        """How many new tokens `seq` could be given slots for right now (room in its last block
        plus every free block)."""
        capacity = (len(seq.block_table) + len(self._free)) * self.block_size
        return max(capacity - seq.num_computed_tokens, 0)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover its next `num_new_tokens` tokens."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free "
                               f"(the scheduler must check can_allocate first)")
        for _ in range(need):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks (finish, abort, error or preemption)."""
        self._free.extend(seq.block_table)
        seq.block_table.clear()
