"""Paged KV-cache bookkeeping: which fixed-size block belongs to which sequence, and which blocks
hold a prefix another request can reuse (automatic prefix caching).

The cache (model/kv_cache.py) is `num_blocks` blocks of `block_size` token slots. A sequence owns
an ordered list of blocks (`Sequence.block_table`); token at position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Blocks are handed out as a sequence
grows (a prefill chunk or a decode token at a time) and all given back when it finishes, is
aborted or is preempted.

Prefix caching (on with `enable_prefix_caching`). Once a block is full and its K/V computed
(`commit`, after the step), it is registered under a hash chain:

    h[0] = H(H("loraplex-kv" | key) | tokens[0:B])      key = "" (base) or the adapter's content key
    h[i] = H(h[i-1] | tokens[i*B:(i+1)*B])

so a block is found only by a sequence with the same tokens before it AND the same adapter
weights: a LoRA on any projection changes the hidden states, so the same tokens under another
adapter have other K/V. The content key changes when an adapter id is loaded again with other
weights, so stale K/V is never found. (H is sha256: a collision would hand one tenant's K/V to
another, so no 64-bit hash.)

Blocks carry reference counts: a sequence whose leading full blocks are in the cache takes them
(`use_cached_prefix`, at admission) instead of computing them, and starts with
`num_computed_tokens` past them. A block whose last reference goes keeps its K/V and hash and
waits in an LRU list; it counts as free, and is evicted (its hash forgotten) only when an
allocation finds no never-used/forgotten block. Sequences give their blocks back last block
first, so a chain is evicted from its tail and its shared head lives longest.

The cached prefix always leaves the last token to compute: the next token is sampled from its
logits. Blocks still being filled are never shared, and nothing is ever written into a full
block, so a shared block never changes under its readers. Two sequences that compute the same
block in the same step both keep their own copy; the second one is simply not registered.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from loraplex.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chain_root(key: str) -> bytes:
    """The hash every chain under `key` (base model "" or an adapter's content key) starts from."""
    return hashlib.sha256(b"loraplex-kv\0" + key.encode()).digest()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block: its parent's hash and its token ids (uint32: ids < vocab)."""
    return hashlib.sha256(parent + array("I", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Unreferenced blocks with nothing reusable in them. FIFO reuse spreads writes over the
        # cache; any order would be correct.
        self._free: deque[int] = deque(range(num_blocks))
        # Unreferenced blocks that still hold a cached prefix, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref = [0] * num_blocks  # sequences holding each block
        self._hash: list[bytes | None] = [None] * num_blocks  # each block's key in `_cached`
        self._cached: dict[bytes, int] = {}  # hash -> the block holding that K/V
        # Monotonic counters (metrics): tokens looked up at admission, how many of them were found
        # in the cache, and cached blocks evicted to make room.
        self.queried_tokens_total = 0
        self.hit_tokens_total = 0
        self.evictions_total = 0

    # --- counts --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (evictable cached blocks included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix, referenced or not."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # --- growing a sequence ----------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs so that its next `num_new_tokens` tokens have a slot."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(cdiv(total, self.block_size) - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Whether seq's next `num_new_tokens` tokens can get slots. For a sequence about to be
        admitted, `num_cached_tokens` (from `cached_prefix_tokens`) says its first chunk comes
        after a prefix taken from the cache: those blocks are not allocated, but the ones nobody
        holds leave the free pool."""
        if num_cached_tokens == 0:
            return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks
        hit = self._match(seq)[:num_cached_tokens // self.block_size]
        need = cdiv(num_cached_tokens + num_new_tokens, self.block_size) - len(hit)
        reclaimed = sum(1 for b in hit if self._ref[b] == 0)
        return need <= self.num_free_blocks - reclaimed

    def max_tokens_allocatable(self, seq: Sequence) -> int:
        """How many new tokens `seq` could be given slots for right now (room in its last block
        plus every free block)."""
        capacity = (len(seq.block_table) + self.num_free_blocks) * self.block_size
        return max(capacity - seq.num_computed_tokens, 0)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover its next `num_new_tokens` tokens."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free_blocks} free "
                               f"(the scheduler must check can_allocate first)")
        for _ in range(need):
            block = self._take_free()
            self._ref[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Drop all of seq's block references (finish, abort, error or preemption). Last block
        first: a released chain is evicted from its tail, its shared head stays longest."""
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None  # most recently used end
                else:
                    self._free.append(block)
        seq.block_table.clear()
        seq.num_hashed_blocks = 0

    # --- prefix cache -----------------------------------------------------------------------------
    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """Tokens at the start of `seq` (one holding no blocks) whose K/V the cache holds: whole
        blocks, at most all tokens but the last. 0 when prefix caching is off. Read-only."""
        return len(self._match(seq)) * self.block_size

    def use_cached_prefix(self, seq: Sequence, num_cached_tokens: int) -> None:
        """Admission: count the lookup, and give `seq` (holding no blocks) the cached blocks of
        its first `num_cached_tokens` tokens (from `cached_prefix_tokens` in the same schedule
        pass); its computation starts after them."""
        if not self._cacheable(seq):
            return
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError("use_cached_prefix on a sequence that already holds blocks")
        hit = self._match(seq)[:num_cached_tokens // self.block_size]
        for block in hit:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        seq.block_table.extend(hit)
        seq.num_hashed_blocks = len(hit)
        seq.num_computed_tokens = len(hit) * self.block_size
        self.queried_tokens_total += seq.num_tokens
        self.hit_tokens_total += seq.num_computed_tokens

    def commit(self, seq: Sequence) -> None:
        """After a step computed seq's tokens: register its newly full blocks in the cache."""
        if not self._cacheable(seq):
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks:  # most decode steps: no block filled up
            return
        for i in range(seq.num_hashed_blocks, full):
            h = self._block_hash(seq, i)
            if h not in self._cached:  # else another sequence registered the same K/V first
                block = seq.block_table[i]
                self._cached[h] = block
                self._hash[block] = h
        seq.num_hashed_blocks = full

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (blocks in use stay with their sequences, unshareable from
        now on). Returns how many blocks were registered."""
        n = len(self._cached)
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        for block in self._cached.values():
            self._hash[block] = None
        self._cached.clear()
        return n

    # --- helpers -----------------------------------------------------------------------------------
    def _cacheable(self, seq: Sequence) -> bool:
        return self.enable_prefix_caching and seq.prefix_cache_key is not None

    def _take_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)  # least recently released
        del self._cached[self._hash[block]]
        self._hash[block] = None
        self.evictions_total += 1
        return block

    def _block_hash(self, seq: Sequence, i: int) -> bytes:
        """Hash of seq's full block i (memoized on seq: its tokens never change once full)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else chain_root(seq.prefix_cache_key)
            hashes.append(block_hash(parent, seq.token_ids[j * bs:(j + 1) * bs]))
        return hashes[i]

    def _match(self, seq: Sequence) -> list[int]:
        """The cached blocks of seq's longest cached prefix (leaving its last token out)."""
        if not self._cacheable(seq):
            return []
        hit = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(self._block_hash(seq, i))
            if block is None:
                break
            hit.append(block)
        return hit
