"""BlockManager prefix caching, without a model: lookups, reference counts, LRU eviction, flush.

The soaks check sharing against a *simulated* KV cache: when a sequence computes position p, the
slot it writes gets the value (adapter key, tokens[:p + 1]) -- exactly what real K/V at p depends
on. Every sequence must then read, at each of its computed positions, the value its own key and
tokens would have produced: a block shared across adapters, across different earlier tokens, or
reused after eviction while someone still reads it, breaks that.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from loraplex.config import EngineConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.request import Request, SamplingParams
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence, SequenceStatus


def make_seq(tokens, rid="r", key: str | None = "") -> Sequence:
    seq = Sequence.from_request(Request(rid, list(tokens), SamplingParams()))
    seq.prefix_cache_key = key
    return seq


def compute(bm: BlockManager, seq: Sequence, n: int, kv: dict | None = None) -> None:
    """What the scheduler + engine do for one chunk: slots, the forward (simulated), commit."""
    bm.allocate(seq, n)
    for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
        block = seq.block_table[p // bm.block_size]
        if kv is not None:
            slot = block * bm.block_size + p % bm.block_size
            kv[slot] = (seq.prefix_cache_key, tuple(seq.token_ids[:p + 1]))
    seq.num_computed_tokens += n
    bm.commit(seq)


def admit(bm: BlockManager, seq: Sequence) -> int:
    cached = bm.cached_prefix_tokens(seq)
    assert bm.can_allocate(seq, seq.num_tokens - cached, cached)
    bm.use_cached_prefix(seq, cached)
    assert seq.num_computed_tokens == cached
    return cached


def check_refcounts(bm: BlockManager, seqs) -> None:
    held: dict[int, int] = {}
    for s in seqs:
        for b in s.block_table:
            held[b] = held.get(b, 0) + 1
    assert all(bm._ref[b] == held.get(b, 0) for b in range(bm.num_blocks)), "reference counts"
    assert bm.num_used_blocks == len(held)
    free = list(bm._free) + list(bm._evictable)
    assert len(free) == len(set(free)) == bm.num_free_blocks and not set(free) & set(held)
    assert all(bm._hash[b] is not None for b in bm._evictable)
    assert all(bm._hash[b] is None for b in bm._free)
    assert {h: b for h, b in bm._cached.items()} == {bm._hash[b]: b for b in range(bm.num_blocks)
                                                       if bm._hash[b] is not None}


def check_kv(bm: BlockManager, seqs, kv: dict) -> None:
    bs = bm.block_size
    for s in seqs:
        for p in range(s.num_computed_tokens):
            slot = s.block_table[p // bs] * bs + p % bs
            assert kv.get(slot) == (s.prefix_cache_key, tuple(s.token_ids[:p + 1])), (s.request_id, p)


def test_shared_prefix_is_found_and_counted():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = make_seq(range(100, 110), "a")  # 10 tokens: blocks 0-3, 4-7 full, 8-9 partial
    assert admit(bm, a) == 0
    compute(bm, a, 10)
    assert bm.num_cached_blocks == 2 and a.num_hashed_blocks == 2
    b = make_seq(list(range(100, 108)) + [1, 2, 3], "b")
    assert admit(bm, b) == 8
    assert b.block_table == a.block_table[:2] and bm._ref[a.block_table[0]] == 2
    compute(bm, b, 3)
    assert bm.queried_tokens_total == 21 and bm.hit_tokens_total == 8
    bm.free(a)
    assert bm.num_used_blocks == 3  # b's two shared blocks and its own third
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.num_cached_blocks == 2
    check_refcounts(bm, [a, b])


def test_the_last_token_is_always_computed():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = make_seq(range(8), "a")
    admit(bm, a)
    compute(bm, a, 8)
    again = make_seq(range(8), "again")  # identical prompt, block aligned
    assert bm.cached_prefix_tokens(again) == 4  # not 8: the 8th token's logits are needed
    longer = make_seq(range(9), "longer")
    assert bm.cached_prefix_tokens(longer) == 8


def test_adapter_key_and_earlier_tokens_separate_blocks():
    bm = BlockManager(32, 4, enable_prefix_caching=True)
    a = make_seq(range(12), "a", key="")
    admit(bm, a)
    compute(bm, a, 12)
    assert bm.cached_prefix_tokens(make_seq(range(13), "x", key="adapter-1")) == 0
    assert bm.cached_prefix_tokens(make_seq(range(13), "y", key=None)) == 0  # never cached
    # Same tokens in block 1 and 2 but another block 0: the chain differs from the start.
    assert bm.cached_prefix_tokens(make_seq([99] + list(range(1, 13)), "z")) == 0
    assert bm.cached_prefix_tokens(make_seq(list(range(4)) + [99] + list(range(5, 13)), "w")) == 4


def test_off_by_flag_caches_nothing():
    bm = BlockManager(8, 4)
    a = make_seq(range(9), "a")
    admit(bm, a)
    compute(bm, a, 9)
    bm.free(a)
    assert bm.num_cached_blocks == 0 and bm.cached_prefix_tokens(make_seq(range(9), "b")) == 0
    assert len(bm._free) == 8 and bm.queried_tokens_total == 0


def test_lru_eviction_takes_never_used_blocks_first_then_oldest_chain_tail_first():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    a = make_seq([1, 2, 3, 4, 5], "a")  # blocks [1,2] [3,4] cached, [5] private
    admit(bm, a)
    compute(bm, a, 5)
    b = make_seq([7, 8, 9, 10, 11], "b")
    admit(bm, b)
    compute(bm, b, 5)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)  # b released after a: a's chain is older
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    c = make_seq([20, 21, 22, 23, 24], "c")
    admit(bm, c)
    bm.allocate(c, 5)  # 3 blocks: the 2 plain ones first, then a's chain from its tail
    assert c.block_table[2] == a_blocks[1] and bm.evictions_total == 1
    assert bm.cached_prefix_tokens(make_seq([1, 2, 3, 4, 5], "a2")) == 2  # head of a survives
    assert bm.cached_prefix_tokens(make_seq([7, 8, 9, 10, 11], "b2")) == 4  # b untouched
    assert set(c.block_table[:2]) == {a_blocks[2], b_blocks[2]}


def test_can_allocate_counts_cached_blocks_that_leave_the_free_pool():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a = make_seq([1, 2, 3, 4, 5, 6, 7], "a")
    admit(bm, a)
    compute(bm, a, 7)  # 4 blocks, 3 cached
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 5, 6, 9, 9, 9], "b")  # hits 3 blocks (6 tokens), needs 2 more
    cached = bm.cached_prefix_tokens(b)
    assert cached == 6
    assert bm.can_allocate(b, 2, cached)  # 1 new block: the plain free one
    assert not bm.can_allocate(b, 3, cached)  # 2 new blocks, but the hits are 3 of the 4 free
    bm.use_cached_prefix(b, cached)
    bm.allocate(b, 2)
    assert bm.num_free_blocks == 0 and bm.evictions_total == 0


def test_blocks_computed_twice_in_one_step_stay_private():
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    a, b = make_seq([1, 2, 3], "a"), make_seq([1, 2, 4], "b")
    admit(bm, a)
    admit(bm, b)  # same step: nothing committed yet
    compute(bm, a, 3)
    compute(bm, b, 3)
    assert bm.num_cached_blocks == 1 and bm._hash[b.block_table[0]] is None
    bm.free(b)
    assert b.block_table == [] and len(bm._free) == 8 - 2  # a holds 2; b's went back plain
    check_refcounts(bm, [a, b])


def test_reset_flushes_everything_and_blocks_in_use_stay_owned():
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    a, b = make_seq([1, 2, 3, 4, 5], "a"), make_seq([6, 7, 8], "b")
    for s in (a, b):
        admit(bm, s)
        compute(bm, s, s.num_tokens)
    bm.free(b)
    assert bm.reset_prefix_cache() == 3
    assert bm.num_cached_blocks == 0 and bm.num_used_blocks == 3
    assert bm.cached_prefix_tokens(make_seq([1, 2, 3, 4, 5], "x")) == 0
    bm.free(a)
    assert bm.num_free_blocks == 8 and len(bm._free) == 8 and not bm._evictable


def test_generated_tokens_are_cached_too_and_serve_a_recompute():
    bm = BlockManager(16, 2, enable_prefix_caching=True)
    s = make_seq([1, 2, 3], "s")
    admit(bm, s)
    compute(bm, s, 3)
    for tok in (4, 5, 6):  # decode: sampled token appended, computed next step
        s.append_token(tok)
        compute(bm, s, 1)
    s.append_token(7)  # sampled, not computed
    bm.free(s)  # preempted
    s.num_computed_tokens = 0
    assert admit(bm, s) == 6  # prompt + generated blocks back from the cache; token 7 computed


# --- soaks -----------------------------------------------------------------------------------------
OPS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 10**6)), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, block_size=st.sampled_from([1, 2, 3]), num_blocks=st.integers(4, 14))
def test_random_operations_keep_counts_and_kv_right(ops, block_size, num_blocks):
    """Admit / compute chunks / decode / release / flush in random order with few distinct tokens
    and keys (lots of sharing, lots of eviction)."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    kv: dict = {}
    live: list[Sequence] = []
    ever: list[Sequence] = []
    for n, (op, r) in enumerate(ops):
        rng = random.Random(r)
        if op <= 1:  # a new request, admitted if its first chunk fits
            s = make_seq([rng.randrange(2) for _ in range(rng.randint(1, 9))], f"s{n}",
                         key=rng.choice(["", "A", "B"]))
            cached = bm.cached_prefix_tokens(s)
            chunk = rng.randint(1, s.num_tokens - cached)
            if bm.can_allocate(s, chunk, cached):
                bm.use_cached_prefix(s, cached)
                compute(bm, s, chunk, kv)
                live.append(s)
                ever.append(s)
        elif op <= 3 and live:  # one more chunk, or a decode
            s = rng.choice(live)
            if s.num_uncomputed_tokens == 0:
                s.append_token(rng.randrange(2))
            k = rng.randint(1, s.num_uncomputed_tokens)
            if bm.can_allocate(s, k):
                compute(bm, s, k, kv)
        elif op == 4 and live:  # finish, cancel or preempt: all the same to the blocks
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)
            s.num_computed_tokens = 0
        elif op == 5 and rng.random() < 0.2:
            bm.reset_prefix_cache()
        check_refcounts(bm, ever)
        check_kv(bm, live, kv)
    for s in live:
        bm.free(s)
    bm.reset_prefix_cache()
    assert bm.num_free_blocks == num_blocks and len(bm._free) == num_blocks and bm.num_cached_blocks == 0


@pytest.mark.parametrize("seed", range(6))
def test_scheduler_soak_with_shared_prefixes_preemption_and_cancellation(seed):
    """The real scheduler over a small cache: requests share system prompts under three keys,
    some are cancelled at random; the simulated KV stays right, every request completes, and after
    the flush every block is free."""
    rng = random.Random(seed)
    # At least 48 slots: the longest request (20 + 8 + 12 tokens) must fit alone (max_model_len).
    bs, num_blocks = rng.choice([2, 4]), rng.choice([24, 40])
    cfg = EngineConfig(block_size=bs, num_kv_blocks=num_blocks, max_num_seqs=6,
                       max_num_batched_tokens=rng.choice([7, 16, 64]))
    bm = BlockManager(num_blocks, bs, enable_prefix_caching=True)
    sch = Scheduler(cfg, bm)
    systems = [[rng.randrange(50) for _ in range(rng.randint(3, 20))] for _ in range(3)]
    kv: dict = {}
    want, seqs = {}, []
    for i in range(40):
        toks = rng.choice(systems) + [rng.randrange(50) for _ in range(rng.randint(1, 8))]
        s = make_seq(toks, f"r{i}", key=rng.choice(["", "A", "B"]))
        want[s.request_id] = rng.randint(1, 12)
        seqs.append(s)
    pending = list(seqs)
    done = preempted = 0
    for _ in range(20000):
        if pending and rng.random() < 0.3:
            sch.add(pending.pop(0))
        if not sch.has_work() and not pending:
            break
        b = sch.schedule()
        preempted += b.num_preempted
        assert b.num_tokens <= cfg.max_num_batched_tokens
        for s, n in zip(b.seqs, b.num_new_tokens):
            assert 1 <= n <= s.num_uncomputed_tokens
            for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
                kv[s.block_table[p // bs] * bs + p % bs] = (s.prefix_cache_key, tuple(s.token_ids[:p + 1]))
        sampled = [s for i, s in enumerate(b.seqs) if b.samples(i)]
        for s, n in zip(b.seqs, b.num_new_tokens):
            s.num_computed_tokens += n
            bm.commit(s)
        for s in sampled:
            s.append_token(rng.randrange(50))
            if s.num_generated >= want[s.request_id]:
                sch.finish(s)
                done += 1
        if sch.running and rng.random() < 0.05:  # a client cancels
            sch.finish(rng.choice(sch.running + list(sch.waiting)))
            done += 1
        check_refcounts(bm, seqs)
        check_kv(bm, sch.running, kv)
    assert done == 40 and not sch.has_work()
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert bm.hit_tokens_total > 0
    assert bm.num_used_blocks == 0
    bm.reset_prefix_cache()
    assert len(bm._free) == num_blocks and bm.num_cached_blocks == 0
